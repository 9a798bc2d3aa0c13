// nbd_load: a libnbd load generator for cbt's integration and crash tests.
//
// Issues random writes, zeroes and trims (mixed sizes, unaligned) at a given
// queue depth over one or more NBD connections, optionally with flushes, and
// records what it did:
//   --expected FILE  the granules the run touched, as merged extents
//                    [{"start","length","dirty"}...] covering the disk
//                    (only requests that succeeded; same form as `cbt map`)
//   --log FILE       one line per request before it is sent ("S conn id op
//                    offset length") and one when it is acknowledged ("A conn
//                    id status"), written unbuffered so that a test killing
//                    the server can tell what was in flight
//   --stamp          every write carries data that names it: the 8-byte
//                    little-endian word at disk offset 8k (of which the
//                    write has some or all bytes) is (tag << 32) | k, with
//                    tag = ((conn + 1) << 24) | id, so that a test can tell
//                    from any byte which request wrote it (ids < 2^24)
//   --hold-file FILE after the requests, create FILE and keep the
//                    connection open until the test removes it
//   --kill-after N --kill-pid PID
//                    send SIGKILL to PID (the server) as soon as N requests
//                    have been acknowledged (counted over all connections,
//                    in completion order, whatever their status), log "K N",
//                    and submit nothing more. Unlike a kill at a wall-clock
//                    instant, this crash point is a count a test can print
//                    and replay with the same --seed.
//   --export NAME    the export to connect to (nbd_set_export_name; default
//                    "", the server's default export)
//   --flush-conns N  only the first N connections flush (--flush-every)
//   --kill-on-flush  with --kill-after N: kill at the first successful flush
//                    acknowledged at or after the Nth ack instead (right
//                    after a completed flush: every write before it must
//                    survive, and the next flush has not begun), or at ack
//                    4N + 1000 if no flush completes by then
// Exit status: 0 when every request succeeded (or --allow-errors), else 1.
#include <fcntl.h>
#include <libnbd.h>
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Options {
  std::string socket;
  std::string export_name;  // --export: "" = the server's default export
  uint64_t seed = 1;
  uint64_t ops = 1000;
  unsigned qd = 8;
  unsigned connections = 1;
  uint64_t granularity = 65536;
  unsigned flush_every = 0;    // flush after every N ops per connection; 0 = never
  unsigned flush_conns = ~0u;  // only connections below this flush
  uint64_t max_len = uint64_t{256} * 1024;
  uint64_t region_offset = 0;  // confine requests to [offset, offset+length)
  uint64_t region_length = 0;  // 0 = whole disk
  std::string expected, log;
  bool allow_errors = false;
  bool final_flush = true;
  bool stamp = false;
  std::string hold_file;    // after the requests: create it, wait until removed
  uint64_t kill_after = 0;  // SIGKILL kill_pid after this many acks; 0 = never
  pid_t kill_pid = 0;
  bool kill_on_flush = false;
};

std::mutex mu;  // guards granules, log writes and error counts
std::vector<bool> granules;
int log_fd = -1;
std::atomic<uint64_t> failures{0};
std::atomic<uint64_t> acks{0};
std::atomic<bool> killed{false};

void LogLine(const std::string& s) {
  if (log_fd < 0) return;
  std::lock_guard lock(mu);
  (void)!write(log_fd, s.data(), s.size());
}

void MarkRange(uint64_t off, uint64_t len, uint64_t g) {
  std::lock_guard lock(mu);
  for (uint64_t n = off / g; n <= (off + len - 1) / g; ++n) granules[n] = true;
}

struct Request {
  unsigned conn;
  uint64_t id, off, len;
  char op;
  const Options* o;
  std::vector<char> data;  // --stamp: this write's own buffer
};

// --stamp: the data of write `id` of `conn` at [off, off+len).
void Stamp(Request* r) {
  const uint64_t tag = ((static_cast<uint64_t>(r->conn) + 1) << 24) | r->id;
  const uint64_t first = r->off / 8, last = (r->off + r->len - 1) / 8;
  std::vector<char> words((last - first + 1) * 8);
  for (uint64_t k = first; k <= last; ++k) {
    uint64_t w = (tag << 32) | k;
    for (int b = 0; b < 8; ++b) words[(k - first) * 8 + b] = static_cast<char>(w >> (8 * b));
  }
  r->data.assign(words.begin() + static_cast<ptrdiff_t>(r->off % 8),
                 words.begin() + static_cast<ptrdiff_t>(r->off % 8 + r->len));
}

int Done(void* user, int* error) {
  auto* r = static_cast<Request*>(user);
  LogLine("A " + std::to_string(r->conn) + " " + std::to_string(r->id) + " " +
          std::to_string(*error) + "\n");
  // The ack is logged first: the Nth ack is in the log before the kill.
  if (r->o->kill_after) {
    const uint64_t n = acks.fetch_add(1) + 1;
    bool now = n == r->o->kill_after;
    if (r->o->kill_on_flush)
      now = (n >= r->o->kill_after && r->op == 'F' && *error == 0) ||
            n == 4 * r->o->kill_after + 1000;
    if (now && !killed.exchange(true)) {
      kill(r->o->kill_pid, SIGKILL);
      LogLine("K " + std::to_string(n) + "\n");
    }
  }
  if (*error == 0) {
    if (r->op != 'F') MarkRange(r->off, r->len, r->o->granularity);
  } else {
    failures.fetch_add(1);
  }
  delete r;
  return 1;  // retire the command
}

// A handle connected to o.socket, export o.export_name; nullptr (reason
// printed) on failure.
nbd_handle* Connect(const Options& o) {
  nbd_handle* h = nbd_create();
  if (h && nbd_set_export_name(h, o.export_name.c_str()) != -1 &&
      nbd_connect_unix(h, o.socket.c_str()) != -1)
    return h;
  fprintf(stderr, "nbd_load: connect %s export \"%s\": %s\n", o.socket.c_str(),
          o.export_name.c_str(), nbd_get_error());
  if (h) nbd_close(h);
  return nullptr;
}

int RunConnection(const Options& o, unsigned conn, uint64_t size) {
  nbd_handle* h = Connect(o);
  if (!h) return 1;
  const bool can_trim = nbd_can_trim(h) == 1, can_zero = nbd_can_zero(h) == 1;
  const bool can_flush = nbd_can_flush(h) == 1;
  std::mt19937_64 rng(o.seed * 1000003 + conn);
  std::vector<char> buf(o.max_len);
  for (auto& c : buf) c = static_cast<char>(rng());
  const uint64_t base = o.region_offset;
  const uint64_t span = o.region_length ? o.region_length : size - base;
  const uint64_t per_conn = o.ops / o.connections + (conn < o.ops % o.connections ? 1 : 0);
  for (uint64_t i = 0; i < per_conn && !killed.load(); ++i) {
    while (nbd_aio_in_flight(h) >= static_cast<int>(o.qd))
      if (nbd_poll(h, -1) == -1) break;
    if (killed.load()) break;
    auto* r = new Request{conn, i, 0, 0, 'W', &o, {}};
    bool flush = o.flush_every && can_flush && conn < o.flush_conns && (i + 1) % o.flush_every == 0;
    if (flush) {
      r->op = 'F';
    } else {
      uint64_t len = (rng() % 8 == 0) ? rng() % o.max_len + 1 : rng() % 16384 + 1;
      len = std::min(len, span);
      r->off = base + rng() % (span - len + 1);
      r->len = len;
      int pick = static_cast<int>(rng() % 20);
      r->op = pick < 12 ? 'W' : pick < 16 ? (can_zero ? 'Z' : 'W') : (can_trim ? 'T' : 'W');
      if (o.stamp && r->op == 'W') Stamp(r);
    }
    LogLine("S " + std::to_string(conn) + " " + std::to_string(i) + " " + r->op + " " +
            std::to_string(r->off) + " " + std::to_string(r->len) + "\n");
    nbd_completion_callback cb = {.callback = Done, .user_data = r, .free = nullptr};
    int64_t cookie;
    switch (r->op) {
      case 'W':
        cookie = nbd_aio_pwrite(h, o.stamp ? r->data.data() : buf.data(), r->len, r->off, cb, 0);
        break;
      case 'Z':
        cookie = nbd_aio_zero(h, r->len, r->off, cb, 0);
        break;
      case 'T':
        cookie = nbd_aio_trim(h, r->len, r->off, cb, 0);
        break;
      default:
        cookie = nbd_aio_flush(h, cb, 0);
        break;
    }
    if (cookie == -1) {
      fprintf(stderr, "nbd_load: submit: %s\n", nbd_get_error());
      failures.fetch_add(1);
      break;
    }
  }
  while (nbd_aio_in_flight(h) > 0)
    if (nbd_poll(h, -1) == -1) break;
  if (o.final_flush && !killed.load() && can_flush && nbd_flush(h, 0) == -1) {
    fprintf(stderr, "nbd_load: flush: %s\n", nbd_get_error());
    failures.fetch_add(1);
  }
  if (!o.hold_file.empty() && conn == 0) {
    // Keep the connection open (no disconnect, so no persist) until the test
    // removes the file; bounded to 120 s.
    FILE* f = fopen(o.hold_file.c_str(), "w");
    if (f) fclose(f);
    for (int i = 0; i < 1200 && access(o.hold_file.c_str(), F_OK) == 0; ++i) usleep(100000);
  }
  nbd_shutdown(h, 0);
  nbd_close(h);
  return 0;
}

void WriteExpected(const Options& o, uint64_t size) {
  FILE* f = fopen(o.expected.c_str(), "w");
  if (!f) {
    perror(o.expected.c_str());
    exit(1);
  }
  fprintf(f, "[");
  const char* sep = "";
  for (uint64_t n = 0; n < granules.size();) {
    bool d = granules[n];
    uint64_t m = n;
    while (m < granules.size() && granules[m] == d) ++m;
    uint64_t start = n * o.granularity, end = std::min(size, m * o.granularity);
    fprintf(f, "%s{\"start\":%llu,\"length\":%llu,\"dirty\":%s}", sep,
            static_cast<unsigned long long>(start), static_cast<unsigned long long>(end - start),
            d ? "true" : "false");
    sep = ",";
    n = m;
  }
  fprintf(f, "]\n");
  fclose(f);
}

[[noreturn]] void Usage() {
  fprintf(stderr,
          "usage: nbd_load --socket PATH [--export NAME] [--seed N] [--ops N] [--qd N]\n"
          "                [--connections N] [--granularity N] [--flush-every N]\n"
          "                [--flush-conns N] [--max-len N]\n"
          "                [--region OFFSET:LENGTH] [--expected FILE] [--log FILE]\n"
          "                [--allow-errors] [--no-final-flush] [--stamp] [--hold-file FILE]\n"
          "                [--kill-after N --kill-pid PID [--kill-on-flush]]\n");
  exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) Usage();
      return argv[++i];
    };
    if (a == "--socket")
      o.socket = val();
    else if (a == "--export")
      o.export_name = val();
    else if (a == "--seed")
      o.seed = std::stoull(val());
    else if (a == "--ops")
      o.ops = std::stoull(val());
    else if (a == "--qd")
      o.qd = static_cast<unsigned>(std::stoul(val()));
    else if (a == "--connections")
      o.connections = static_cast<unsigned>(std::stoul(val()));
    else if (a == "--granularity")
      o.granularity = std::stoull(val());
    else if (a == "--flush-every")
      o.flush_every = static_cast<unsigned>(std::stoul(val()));
    else if (a == "--flush-conns")
      o.flush_conns = static_cast<unsigned>(std::stoul(val()));
    else if (a == "--max-len")
      o.max_len = std::stoull(val());
    else if (a == "--region") {
      std::string v = val();
      size_t c = v.find(':');
      if (c == std::string::npos) Usage();
      o.region_offset = std::stoull(v.substr(0, c));
      o.region_length = std::stoull(v.substr(c + 1));
    } else if (a == "--expected")
      o.expected = val();
    else if (a == "--log")
      o.log = val();
    else if (a == "--allow-errors")
      o.allow_errors = true;
    else if (a == "--no-final-flush")
      o.final_flush = false;
    else if (a == "--stamp")
      o.stamp = true;
    else if (a == "--hold-file")
      o.hold_file = val();
    else if (a == "--kill-after")
      o.kill_after = std::stoull(val());
    else if (a == "--kill-on-flush")
      o.kill_on_flush = true;
    else if (a == "--kill-pid")
      o.kill_pid = static_cast<pid_t>(std::stol(val()));
    else
      Usage();
  }
  if (o.socket.empty() || o.connections == 0 || o.qd == 0) Usage();
  if (o.stamp && o.ops / o.connections + 1 >= (uint64_t{1} << 24)) Usage();
  if ((o.kill_after == 0) != (o.kill_pid <= 0)) Usage();  // both or neither

  nbd_handle* h = Connect(o);
  if (!h) return 1;
  int64_t size = nbd_get_size(h);
  nbd_shutdown(h, 0);
  nbd_close(h);
  if (size <= 0) return 1;
  if (o.region_offset + o.region_length > static_cast<uint64_t>(size)) Usage();
  granules.assign((static_cast<uint64_t>(size) + o.granularity - 1) / o.granularity, false);
  if (!o.log.empty()) {
    log_fd = open(o.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (log_fd < 0) {
      perror(o.log.c_str());
      return 1;
    }
  }
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (unsigned c = 0; c < o.connections; ++c)
    threads.emplace_back([&, c] { bad += RunConnection(o, c, static_cast<uint64_t>(size)); });
  for (auto& t : threads) t.join();
  if (!o.expected.empty()) WriteExpected(o, static_cast<uint64_t>(size));
  if (bad) return 1;
  if (failures && !o.allow_errors) {
    fprintf(stderr, "nbd_load: %llu requests failed\n",
            static_cast<unsigned long long>(failures.load()));
    return 1;
  }
  return 0;
}
