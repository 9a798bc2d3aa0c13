// nbd_mirror: a libnbd random-operation driver that keeps a raw mirror of
// what the export must contain (tests/integration/test-qcow2-plugin-random-ops.sh).
//
// Runs a seeded sequence of writes (random data, 1 B .. ~1 MiB, aligned and
// unaligned, biased toward cluster-boundary crossings), write_zeroes (with
// and without NO_HOLE, sometimes FAST_ZERO), trims, flushes and reads over
// --conns N connections with up to --qd requests in flight on each (libnbd
// aio, one thread polling every connection). Each acknowledged request is
// applied to --mirror FILE (a raw file of the export's size holding the
// export's initial content):
//   write, zero  the range is copied / zeroed;
//   trim         only the whole --cluster clusters it covers are zeroed, a
//                partial-cluster head or tail is left as it was (the server
//                ignores sub-cluster trims; no backing file, so a trimmed
//                cluster reads zeros);
//   FAST_ZERO    ENOTSUP is a legal answer: the zero is then sent again
//                without the flag (what a client does), so the range is
//                zeroed either way;
//   read         the data must equal the mirror's (checked at completion).
// No two requests whose ranges, rounded out to the cluster size, overlap are
// ever in flight at once, and requests are issued in the seeded order, so the
// final content is a function of the seed alone. --verify reads the whole
// export back at the end and compares it with the mirror.
//
// --stress-one-cluster: rounds of many concurrent small writes (and a few
// zeroes) from all connections into disjoint byte ranges of the same two
// fresh clusters (a lost update in the copy-on-write of a newly allocated
// cluster shows as a missing piece), while a trim of the previous round's
// last cluster (a whole cluster, next to the ones being written) races them.
// The export must be fresh (all zeros, unallocated) in --size.
//
// --mutate-drop N / --mutate-trim-partial: TEST OF THE TEST only. Leave
// the first write acknowledged at or after request N out of the mirror /
// zero the partial-cluster parts of trims too,
// so a test can show that its comparison catches a wrong mirror.
//
// --trace FILE: one line per acknowledged request, in the order they were
// applied to the mirror: "idx conn kind offset length flags errno" (what a
// failing test greps for the requests that last touched an offset).
//
// Prints one summary line. Exit status: 0 when every request got the answer
// it should and every read matched, 1 otherwise, 2 on bad usage.
#include <fcntl.h>
#include <libnbd.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string socket, mirror;
  uint64_t seed = 1;
  uint64_t ops = 1000;
  uint64_t size = 0;  // 0 = the export's size
  uint64_t cluster = 65536;
  unsigned conns = 1;
  unsigned qd = 4;
  uint64_t max_len = 1024 * 1024 + 4096;
  unsigned read_pct = 10;
  bool verify = false;
  bool stress = false;
  int64_t mutate_drop = -1;
  bool mutate_trim_partial = false;
  std::string trace;
};

enum class Kind { kWrite, kZero, kTrim, kFlush, kRead };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kWrite:
      return "write";
    case Kind::kZero:
      return "zero";
    case Kind::kTrim:
      return "trim";
    case Kind::kFlush:
      return "flush";
    default:
      return "read";
  }
}

struct Op {
  uint64_t idx = 0;
  Kind kind = Kind::kWrite;
  uint64_t off = 0, len = 0;
  uint32_t flags = 0;
  unsigned conn = 0;
  std::vector<char> buf;    // write data / read destination
  uint64_t lo = 0, hi = 0;  // tracked range [lo, hi): rounded out to the granule
  int err = 0;
  bool verify_read = false;  // a read of the final --verify pass
};

struct Conn {
  nbd_handle* h = nullptr;
  unsigned in_flight = 0;
};

struct Stats {
  uint64_t writes = 0, write_bytes = 0, zeroes = 0, zero_nohole = 0, zero_fast = 0,
           fast_enotsup = 0, trims = 0, trim_clusters = 0, flushes = 0, reads = 0, fua = 0;
  uint64_t overlap_waits = 0, max_in_flight = 0, errors = 0, mismatches = 0;
  uint64_t rounds = 0;
};

Options o;
Stats st;
std::vector<Conn> conns;
std::vector<Op*> in_flight;  // every request sent and not yet processed
std::vector<Op*> completed;  // acknowledged, waiting for ProcessCompletions
std::deque<Op*> resend;      // FAST_ZERO answered ENOTSUP: send again without it
int mirror_fd = -1;
FILE* trace_fp = nullptr;
uint64_t granule = 1;  // in-flight overlap tracking granule
bool can_fua = false, can_fast_zero = false, can_trim = false, can_zero = false, can_flush = false;
const std::vector<char> zeros(1 << 20, 0);

[[noreturn]] void Die(const std::string& what) {
  fprintf(stderr, "nbd_mirror: %s\n", what.c_str());
  exit(1);
}

void MirrorWrite(const char* data, uint64_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pwrite(mirror_fd, data, len, static_cast<off_t>(off));
    if (n <= 0) Die(std::string("mirror pwrite: ") + strerror(errno));
    data += n;
    len -= static_cast<uint64_t>(n);
    off += static_cast<uint64_t>(n);
  }
}

void MirrorZero(uint64_t off, uint64_t len) {
  while (len > 0) {
    uint64_t n = std::min<uint64_t>(len, zeros.size());
    MirrorWrite(zeros.data(), n, off);
    off += n;
    len -= n;
  }
}

void MirrorRead(char* data, uint64_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pread(mirror_fd, data, len, static_cast<off_t>(off));
    if (n <= 0) Die(std::string("mirror pread: ") + strerror(errno));
    data += n;
    len -= static_cast<uint64_t>(n);
    off += static_cast<uint64_t>(n);
  }
}

std::string Describe(const Op& op) {
  char b[160];
  std::string id = op.verify_read ? "final read-back" : "#" + std::to_string(op.idx);
  snprintf(b, sizeof b, "%s conn %u %s off %llu len %llu flags 0x%x", id.c_str(), op.conn,
           KindName(op.kind), static_cast<unsigned long long>(op.off),
           static_cast<unsigned long long>(op.len), op.flags);
  return b;
}

// The effect of an acknowledged request on the mirror (and the check of a read).
void Apply(Op& op) {
  static bool dropped = false;
  bool drop = false;
  if (!dropped && o.mutate_drop >= 0 && op.kind == Kind::kWrite &&
      op.idx >= static_cast<uint64_t>(o.mutate_drop)) {
    drop = dropped = true;
    fprintf(stderr, "nbd_mirror: MUTATION: %s left out of the mirror\n", Describe(op).c_str());
  }
  switch (op.kind) {
    case Kind::kWrite:
      if (!drop) MirrorWrite(op.buf.data(), op.len, op.off);
      break;
    case Kind::kZero:
      if (!drop) MirrorZero(op.off, op.len);
      break;
    case Kind::kTrim: {
      uint64_t a = (op.off + o.cluster - 1) / o.cluster * o.cluster;
      uint64_t b = (op.off + op.len) / o.cluster * o.cluster;
      if (o.mutate_trim_partial) a = op.off, b = op.off + op.len;
      if (a < b) {
        st.trim_clusters += (b - a) / o.cluster;
        if (!drop) MirrorZero(a, b - a);
      }
      break;
    }
    case Kind::kRead: {
      std::vector<char> want(op.len);
      MirrorRead(want.data(), op.len, op.off);
      if (memcmp(want.data(), op.buf.data(), op.len) != 0) {
        uint64_t i = 0;
        while (want[i] == op.buf[i]) ++i;
        if (st.mismatches++ < 5)
          fprintf(stderr, "nbd_mirror: %s: data differs from the mirror first at offset %llu\n",
                  Describe(op).c_str(), static_cast<unsigned long long>(op.off + i));
      }
      break;
    }
    case Kind::kFlush:
      break;
  }
}

int OnDone(void* user, int* error) {
  auto* op = static_cast<Op*>(user);
  op->err = *error;
  completed.push_back(op);
  return 1;  // retire the command
}

bool Overlaps(const Op& op) {
  if (op.kind == Kind::kFlush) return false;
  for (const Op* f : in_flight)
    if (f->kind != Kind::kFlush && op.lo < f->hi && f->lo < op.hi) return true;
  for (const Op* f : resend)
    if (op.lo < f->hi && f->lo < op.hi) return true;
  return false;
}

void Submit(Op* op) {
  Conn& c = conns[op->conn];
  nbd_completion_callback cb = {.callback = OnDone, .user_data = op, .free = nullptr};
  int64_t cookie = -1;
  switch (op->kind) {
    case Kind::kWrite:
      cookie = nbd_aio_pwrite(c.h, op->buf.data(), op->len, op->off, cb, op->flags);
      break;
    case Kind::kZero:
      cookie = nbd_aio_zero(c.h, op->len, op->off, cb, op->flags);
      break;
    case Kind::kTrim:
      cookie = nbd_aio_trim(c.h, op->len, op->off, cb, op->flags);
      break;
    case Kind::kFlush:
      cookie = nbd_aio_flush(c.h, cb, 0);
      break;
    case Kind::kRead:
      op->buf.resize(op->len);
      cookie = nbd_aio_pread(c.h, op->buf.data(), op->len, op->off, cb, 0);
      break;
  }
  if (cookie == -1) Die("submit " + Describe(*op) + ": " + nbd_get_error());
  ++c.in_flight;
  in_flight.push_back(op);
  st.max_in_flight = std::max<uint64_t>(st.max_in_flight, in_flight.size());
}

// One poll over every connection that has work, then the libnbd notifications.
void PollOnce() {
  std::vector<pollfd> fds(conns.size());
  for (size_t i = 0; i < conns.size(); ++i) {
    unsigned dir = nbd_aio_get_direction(conns[i].h);
    fds[i].fd = nbd_aio_get_fd(conns[i].h);
    fds[i].events = static_cast<short>(((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                                       ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0));
    fds[i].revents = 0;
  }
  int r = poll(fds.data(), fds.size(), 60000);
  if (r == -1) {
    if (errno == EINTR) return;
    Die(std::string("poll: ") + strerror(errno));
  }
  if (r == 0) Die("no reply from the server within 60 s");
  for (size_t i = 0; i < conns.size(); ++i) {
    int n = 0;
    if (fds[i].revents & (POLLIN | POLLHUP))
      n = nbd_aio_notify_read(conns[i].h);
    else if (fds[i].revents & POLLOUT)
      n = nbd_aio_notify_write(conns[i].h);
    else if (fds[i].revents & (POLLERR | POLLNVAL))
      Die("connection " + std::to_string(i) + ": server closed the socket");
    if (n == -1) Die("connection " + std::to_string(i) + ": " + nbd_get_error());
  }
}

void ProcessCompletions() {
  std::vector<Op*> done;
  done.swap(completed);
  for (Op* op : done) {
    --conns[op->conn].in_flight;
    in_flight.erase(std::find(in_flight.begin(), in_flight.end(), op));
    if (op->kind == Kind::kZero && (op->flags & LIBNBD_CMD_FLAG_FAST_ZERO) && op->err == ENOTSUP) {
      // Legal: the server cannot zero fast. Zero it the slow way; the range
      // stays reserved (Overlaps looks at resend too).
      ++st.fast_enotsup;
      op->flags &= ~LIBNBD_CMD_FLAG_FAST_ZERO;
      op->err = 0;
      resend.push_back(op);
      continue;
    }
    if (trace_fp && !op->verify_read)
      fprintf(trace_fp, "%llu %u %s %llu %llu 0x%x %d\n", static_cast<unsigned long long>(op->idx),
              op->conn, KindName(op->kind), static_cast<unsigned long long>(op->off),
              static_cast<unsigned long long>(op->len), op->flags, op->err);
    if (op->err != 0) {
      if (st.errors++ < 5)
        fprintf(stderr, "nbd_mirror: %s failed: %s\n", Describe(*op).c_str(), strerror(op->err));
    } else {
      Apply(*op);
    }
    delete op;
  }
}

void Wait() {
  PollOnce();
  ProcessCompletions();
}

// Issue op on its connection once the connection has a free slot and no
// request in flight overlaps its range.
void Issue(Op* op) {
  op->lo = op->off / granule * granule;
  op->hi = (op->off + op->len + granule - 1) / granule * granule;
  bool counted = false;
  for (;;) {
    while (!resend.empty() && conns[resend.front()->conn].in_flight < o.qd) {
      Submit(resend.front());
      resend.pop_front();
    }
    bool overlap = Overlaps(*op);
    if (!overlap && conns[op->conn].in_flight < o.qd) break;
    if (overlap && !counted) ++st.overlap_waits, counted = true;
    Wait();
  }
  Submit(op);
}

void Drain() {
  while (!in_flight.empty() || !resend.empty()) {
    while (!resend.empty() && conns[resend.front()->conn].in_flight < o.qd) {
      Submit(resend.front());
      resend.pop_front();
    }
    if (!in_flight.empty()) Wait();
  }
}

void Count(const Op& op) {
  switch (op.kind) {
    case Kind::kWrite:
      ++st.writes;
      st.write_bytes += op.len;
      break;
    case Kind::kZero:
      ++st.zeroes;
      if (op.flags & LIBNBD_CMD_FLAG_NO_HOLE) ++st.zero_nohole;
      if (op.flags & LIBNBD_CMD_FLAG_FAST_ZERO) ++st.zero_fast;
      break;
    case Kind::kTrim:
      ++st.trims;
      break;
    case Kind::kFlush:
      ++st.flushes;
      break;
    case Kind::kRead:
      if (!op.verify_read) ++st.reads;
      break;
  }
  if (op.flags & LIBNBD_CMD_FLAG_FUA) ++st.fua;
}

void FillRandom(std::vector<char>& buf, std::mt19937_64& rng) {
  size_t i = 0;
  for (; i + 8 <= buf.size(); i += 8) {
    uint64_t v = rng();
    memcpy(buf.data() + i, &v, 8);
  }
  for (; i < buf.size(); ++i) buf[i] = static_cast<char>(rng());
}

uint64_t PickLen(std::mt19937_64& rng) {
  unsigned r = static_cast<unsigned>(rng() % 100);
  if (r < 10) return 1 + rng() % 16;
  if (r < 55) return 1 + rng() % 8192;
  if (r < 85) return 1 + rng() % 131072;
  return 1 + rng() % o.max_len;
}

// The next request of the random sequence (everything drawn from rng, so the
// sequence depends on the seed only).
Op* NextRandom(std::mt19937_64& rng, uint64_t idx) {
  auto* op = new Op;
  op->idx = idx;
  op->conn = static_cast<unsigned>(rng() % o.conns);
  const unsigned w_write = 45, w_zero = can_zero ? 17 : 0, w_trim = can_trim ? 18 : 0,
                 w_read = o.read_pct, w_flush = can_flush ? 3 : 0;
  unsigned k = static_cast<unsigned>(rng() % (w_write + w_zero + w_trim + w_read + w_flush));
  if (k < w_write)
    op->kind = Kind::kWrite;
  else if ((k -= w_write) < w_zero)
    op->kind = Kind::kZero;
  else if ((k -= w_zero) < w_trim)
    op->kind = Kind::kTrim;
  else if ((k -= w_trim) < w_read)
    op->kind = Kind::kRead;
  else
    op->kind = Kind::kFlush;
  if (op->kind == Kind::kFlush) return op;

  const uint64_t size = o.size, cl = o.cluster, nclusters = size / cl;
  // Zeroes and trims carry no payload: allow several clusters of them.
  const uint64_t big = op->kind == Kind::kZero || op->kind == Kind::kTrim
                           ? std::max<uint64_t>(4 << 20, 2 * cl)
                           : std::max<uint64_t>(o.max_len, cl);
  unsigned m = static_cast<unsigned>(rng() % 100);
  uint64_t off, len;
  if (m < 30 && nclusters > 1) {
    // Crosses a cluster boundary b: starts before it, ends after it.
    uint64_t b = cl * (1 + rng() % (nclusters - 1));
    len = std::max<uint64_t>(2, PickLen(rng));
    uint64_t before = 1 + rng() % std::min(len - 1, b);
    off = b - before;
  } else if (m < 55) {
    // Cluster-aligned, whole clusters (or 4 KiB-aligned inside big clusters).
    if (cl > 4096 && rng() % 3 == 0) {
      off = 4096 * (rng() % (size / 4096));
      len = 4096 * (1 + rng() % std::max<uint64_t>(1, std::min<uint64_t>(64, big / 4096)));
    } else {
      off = cl * (rng() % nclusters);
      len = cl * (1 + rng() % std::max<uint64_t>(1, std::min<uint64_t>(64, big / cl)));
    }
  } else if (m < 65) {
    off = 512 * (rng() % (size / 512));
    len = 512 * (1 + rng() % 256);
  } else {
    len = std::min(PickLen(rng), size);
    off = rng() % (size - len + 1);
  }
  if (off >= size) off = size - 1;
  len = std::min(len, size - off);
  op->off = off;
  op->len = len;
  if (op->kind == Kind::kWrite) {
    op->buf.resize(len);
    FillRandom(op->buf, rng);
    if (can_fua && rng() % 10 == 0) op->flags |= LIBNBD_CMD_FLAG_FUA;
  } else if (op->kind == Kind::kZero) {
    if (rng() % 2) op->flags |= LIBNBD_CMD_FLAG_NO_HOLE;
    if (can_fast_zero && rng() % 4 == 0) op->flags |= LIBNBD_CMD_FLAG_FAST_ZERO;
    if (can_fua && rng() % 10 == 0) op->flags |= LIBNBD_CMD_FLAG_FUA;
  }
  return op;
}

void RunRandom() {
  std::mt19937_64 rng(o.seed);
  for (uint64_t i = 0; i < o.ops; ++i) {
    Op* op = NextRandom(rng, i);
    Count(*op);
    Issue(op);
  }
  Drain();
}

// Stress: round r writes clusters 2r and 2r+1 (fresh) in disjoint pieces from
// every connection at once, and trims cluster 2r-1 (written whole in round
// r-1, next to cluster 2r).
void RunStress() {
  std::mt19937_64 rng(o.seed);
  const uint64_t cl = o.cluster, nclusters = o.size / cl;
  const unsigned pieces = std::max(2u, o.conns * o.qd / 2);
  if (cl < pieces) Die("--cluster is smaller than the pieces per cluster");
  uint64_t idx = 0;
  for (uint64_t r = 0; idx < o.ops && 2 * r + 1 < nclusters; ++r) {
    std::vector<Op*> round;
    for (uint64_t c = 2 * r; c <= 2 * r + 1; ++c) {
      std::vector<uint64_t> cuts{0, cl};
      while (cuts.size() < pieces + 1) {
        uint64_t x = 1 + rng() % (cl - 1);
        if (std::find(cuts.begin(), cuts.end(), x) == cuts.end()) cuts.push_back(x);
      }
      std::sort(cuts.begin(), cuts.end());
      for (size_t i = 0; i + 1 < cuts.size(); ++i) {
        auto* op = new Op;
        op->off = c * cl + cuts[i];
        op->len = cuts[i + 1] - cuts[i];
        if (rng() % 8 == 0 && can_zero) {
          op->kind = Kind::kZero;
          if (rng() % 2) op->flags |= LIBNBD_CMD_FLAG_NO_HOLE;
        } else {
          op->kind = Kind::kWrite;
          op->buf.resize(op->len);
          FillRandom(op->buf, rng);
        }
        round.push_back(op);
      }
    }
    std::shuffle(round.begin(), round.end(), rng);
    if (r > 0 && can_trim) {
      auto* t = new Op;
      t->kind = Kind::kTrim;
      t->off = (2 * r - 1) * cl;
      t->len = cl;
      round.insert(round.begin() + static_cast<long>(rng() % (round.size() + 1)), t);
    }
    if (can_flush && r % 8 == 7) {
      auto* f = new Op;
      f->kind = Kind::kFlush;
      round.insert(round.begin() + static_cast<long>(rng() % (round.size() + 1)), f);
    }
    for (size_t i = 0; i < round.size(); ++i) {
      round[i]->idx = idx++;
      round[i]->conn = static_cast<unsigned>(i % o.conns);
      Count(*round[i]);
      Issue(round[i]);
    }
    Drain();  // round barrier: the next round trims this round's cluster
    ++st.rounds;
  }
}

// Read the whole range back (as tracked reads on every connection).
void RunVerify() {
  const uint64_t chunk = 1 << 20;
  unsigned c = 0;
  for (uint64_t off = 0; off < o.size; off += chunk) {
    auto* op = new Op;
    op->kind = Kind::kRead;
    op->verify_read = true;
    op->idx = UINT64_MAX;
    op->off = off;
    op->len = std::min(chunk, o.size - off);
    op->conn = c++ % o.conns;
    Issue(op);
  }
  Drain();
}

[[noreturn]] void Usage() {
  fprintf(stderr,
          "usage: nbd_mirror --socket PATH --mirror FILE [--conns N] [--qd N] [--seed S]\n"
          "                  [--ops K] [--size BYTES] [--cluster BYTES] [--max-len BYTES]\n"
          "                  [--read-pct P] [--verify] [--stress-one-cluster] [--trace FILE]\n"
          "                  [--mutate-drop N] [--mutate-trim-partial]\n");
  exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) Usage();
      return argv[++i];
    };
    try {
      if (a == "--socket")
        o.socket = val();
      else if (a == "--mirror")
        o.mirror = val();
      else if (a == "--conns")
        o.conns = static_cast<unsigned>(std::stoul(val()));
      else if (a == "--qd")
        o.qd = static_cast<unsigned>(std::stoul(val()));
      else if (a == "--seed")
        o.seed = std::stoull(val());
      else if (a == "--ops")
        o.ops = std::stoull(val());
      else if (a == "--size")
        o.size = std::stoull(val());
      else if (a == "--cluster")
        o.cluster = std::stoull(val());
      else if (a == "--max-len")
        o.max_len = std::stoull(val());
      else if (a == "--read-pct")
        o.read_pct = static_cast<unsigned>(std::stoul(val()));
      else if (a == "--verify")
        o.verify = true;
      else if (a == "--stress-one-cluster")
        o.stress = true;
      else if (a == "--mutate-drop")
        o.mutate_drop = std::stoll(val());
      else if (a == "--trace")
        o.trace = val();
      else if (a == "--mutate-trim-partial")
        o.mutate_trim_partial = true;
      else
        Usage();
    } catch (const std::exception&) {
      Usage();
    }
  }
  if (o.socket.empty() || o.mirror.empty() || o.conns == 0 || o.qd == 0 || o.cluster == 0 ||
      o.max_len == 0)
    Usage();

  conns.resize(o.conns);
  for (unsigned c = 0; c < o.conns; ++c) {
    conns[c].h = nbd_create();
    if (!conns[c].h || nbd_connect_unix(conns[c].h, o.socket.c_str()) == -1)
      Die("connect " + o.socket + ": " + nbd_get_error());
  }
  nbd_handle* h0 = conns[0].h;
  const int64_t export_size = nbd_get_size(h0);
  if (export_size <= 0) Die(std::string("export size: ") + nbd_get_error());
  if (o.size == 0) o.size = static_cast<uint64_t>(export_size);
  if (o.size > static_cast<uint64_t>(export_size) || o.size % o.cluster != 0 ||
      o.size < o.cluster || o.size < 4096)
    Die("--size must be a multiple of --cluster (at least 4 KiB) within the export");
  if (nbd_is_read_only(h0) == 1) Die("the export is read-only");
  can_fua = nbd_can_fua(h0) == 1;
  can_fast_zero = nbd_can_fast_zero(h0) == 1;
  can_trim = nbd_can_trim(h0) == 1;
  can_zero = nbd_can_zero(h0) == 1;
  can_flush = nbd_can_flush(h0) == 1;
  const bool multi_conn = nbd_can_multi_conn(h0) == 1;
  const int64_t min_block = nbd_get_block_size(h0, LIBNBD_SIZE_MINIMUM);
  const int64_t max_block = nbd_get_block_size(h0, LIBNBD_SIZE_MAXIMUM);
  if (max_block > 0) o.max_len = std::min<uint64_t>(o.max_len, static_cast<uint64_t>(max_block));

  mirror_fd = open(o.mirror.c_str(), O_RDWR);
  if (mirror_fd < 0) Die(o.mirror + ": " + strerror(errno));
  struct stat sb;
  if (fstat(mirror_fd, &sb) == -1 || static_cast<int64_t>(sb.st_size) != export_size)
    Die(o.mirror + ": not the size of the export (" + std::to_string(export_size) + ")");

  if (!o.trace.empty() && !(trace_fp = fopen(o.trace.c_str(), "w")))
    Die(o.trace + ": " + strerror(errno));
  granule = o.stress ? 1 : o.cluster;
  if (o.stress)
    RunStress();
  else
    RunRandom();
  for (unsigned c = 0; c < o.conns; ++c)
    if (can_flush && nbd_flush(conns[c].h, 0) == -1) {
      fprintf(stderr, "nbd_mirror: final flush on connection %u: %s\n", c, nbd_get_error());
      ++st.errors;
    }
  if (o.verify) RunVerify();
  for (auto& c : conns) {
    nbd_shutdown(c.h, 0);
    nbd_close(c.h);
  }
  if (trace_fp && fclose(trace_fp) != 0) Die(o.trace + ": " + strerror(errno));
  if (fsync(mirror_fd) == -1 || close(mirror_fd) == -1)
    Die("mirror: " + std::string(strerror(errno)));

  printf(
      "nbd_mirror: %s seed %llu conns %u qd %u cluster %llu size %llu: %llu writes (%llu bytes), "
      "%llu zeroes (%llu no-hole, %llu fast, %llu fast ENOTSUP), %llu trims (%llu whole "
      "clusters), %llu flushes, %llu fua, %llu reads, %llu rounds; max in flight %llu, %llu "
      "overlap waits; multi-conn %d, block min %lld; %llu errors, %llu read mismatches%s\n",
      o.stress ? "stress-one-cluster" : "random", static_cast<unsigned long long>(o.seed), o.conns,
      o.qd, static_cast<unsigned long long>(o.cluster), static_cast<unsigned long long>(o.size),
      static_cast<unsigned long long>(st.writes), static_cast<unsigned long long>(st.write_bytes),
      static_cast<unsigned long long>(st.zeroes), static_cast<unsigned long long>(st.zero_nohole),
      static_cast<unsigned long long>(st.zero_fast),
      static_cast<unsigned long long>(st.fast_enotsup), static_cast<unsigned long long>(st.trims),
      static_cast<unsigned long long>(st.trim_clusters),
      static_cast<unsigned long long>(st.flushes), static_cast<unsigned long long>(st.fua),
      static_cast<unsigned long long>(st.reads), static_cast<unsigned long long>(st.rounds),
      static_cast<unsigned long long>(st.max_in_flight),
      static_cast<unsigned long long>(st.overlap_waits), multi_conn ? 1 : 0,
      static_cast<long long>(min_block), static_cast<unsigned long long>(st.errors),
      static_cast<unsigned long long>(st.mismatches),
      o.mutate_drop >= 0 || o.mutate_trim_partial ? " (MUTATED mirror)" : "");
  return st.errors || st.mismatches ? 1 : 0;
}
