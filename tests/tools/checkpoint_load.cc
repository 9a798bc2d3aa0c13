// checkpoint_load: writers under load while a checkpoint is taken over the
// control socket (issue 9, docs/control.md), and a log for a checker
// (tests/integration/checkpoint_check.py).
//
// --threads N connections (one libnbd handle and one thread each; the export
// allows multi-conn) issue 4 KiB writes at queue depth --qd. Every write gets a
// global sequence number k and goes to offset k * granularity, so it touches
// granule k and no other. For each write the log has its send time (taken
// before it is submitted) and its ack time (taken in the completion callback,
// so after the reply arrived), on one steady_clock.
//
// Once --before writes have been acknowledged, a control thread (connected to
// the control socket before the writers start) sends
//   {"execute":"checkpoint","arguments":{"freeze":F,"new":N},"id":1}
// taking the time before the send, and the time once the reply line is read.
// Every time is taken conservatively: a recorded send is not later than the
// real one, a recorded ack or reply is not earlier. The writers then go on
// until --after more writes have been submitted after the reply, and all
// disconnect (which persists).
//
// --kill-pid PID --kill-after N: SIGKILL PID (the server) once N writes sent
// after the checkpoint reply have been acknowledged (N = 0: as soon as the
// reply is read), then stop. Writes in flight at the kill fail; the log says
// so (status != 0).
//
// Log (--log FILE), one record per line, written at the end:
//   C SEND_NS REPLY_NS REPLY-LINE      the checkpoint (REPLY-LINE verbatim)
//   K KILL_NS                          when the server was killed
//   W SEQ CONN OFFSET LENGTH SEND_NS ACK_NS STATUS
//                                      every submitted write; STATUS 0 = ok,
//                                      an errno, or -1 = never completed
// Exit status: 0 when the checkpoint succeeded and every write did (with
// --kill-pid: every write acknowledged before the kill), 1 otherwise, 2 for
// bad usage.
#include <libnbd.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr uint64_t kWriteSize = 4096;

struct Options {
  std::string socket, control, log;
  unsigned threads = 4;
  unsigned qd = 4;
  uint64_t granularity = 65536;
  uint64_t before = 1500;   // acks before the checkpoint is sent
  uint64_t after = 1500;    // writes submitted after its reply
  uint64_t max_writes = 0;  // 0: as many granules as the disk has
  std::string freeze = "b0", new_name = "b1";
  pid_t kill_pid = 0;
  int64_t kill_after = -1;  // post-reply acks before the SIGKILL; -1 = never
};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Record {
  unsigned conn = 0;
  int64_t send_ns = 0;  // 0: never submitted
  int64_t ack_ns = 0;
  int status = -1;
};

// Each record is written by the thread that submits it (conn, send) and by
// its completion callback on the same thread (ack, status); read after join.
std::vector<Record> records;
std::atomic<uint64_t> next_seq{0};
std::atomic<uint64_t> stop_seq{std::numeric_limits<uint64_t>::max()};
std::atomic<uint64_t> acked{0};
std::atomic<uint64_t> acked_after_reply{0};
std::atomic<int64_t> reply_ns{0};  // 0 until the checkpoint reply is read
std::atomic<int64_t> kill_ns{0};
std::atomic<bool> killed{false};
std::atomic<unsigned> writers_done{0};
std::atomic<uint64_t> failures_before_kill{0};

void KillServer(const Options& o) {
  bool expected = false;
  if (!killed.compare_exchange_strong(expected, true)) return;
  kill_ns.store(NowNs());
  kill(o.kill_pid, SIGKILL);
}

struct Request {
  uint64_t seq;
  const Options* o;
};

int Done(void* user, int* error) {
  auto* r = static_cast<Request*>(user);
  Record& rec = records[r->seq];
  rec.ack_ns = NowNs();
  rec.status = *error;
  if (*error == 0) {
    acked.fetch_add(1);
    int64_t reply = reply_ns.load();
    if (reply != 0 && rec.send_ns > reply) {
      uint64_t n = acked_after_reply.fetch_add(1) + 1;
      if (r->o->kill_after > 0 && n == static_cast<uint64_t>(r->o->kill_after)) KillServer(*r->o);
    }
  } else if (!killed.load()) {
    failures_before_kill.fetch_add(1);
  }
  delete r;
  return 1;  // retire the command
}

int RunWriter(const Options& o, unsigned conn, const std::vector<char>& buf) {
  nbd_handle* h = nbd_create();
  if (!h || nbd_connect_unix(h, o.socket.c_str()) == -1) {
    fprintf(stderr, "checkpoint_load: connect %s: %s\n", o.socket.c_str(), nbd_get_error());
    if (h) nbd_close(h);
    writers_done.fetch_add(1);
    return 1;
  }
  int bad = 0;
  bool dead = false;
  for (;;) {
    while (!dead && nbd_aio_in_flight(h) >= static_cast<int>(o.qd))
      if (nbd_poll(h, -1) == -1) dead = true;
    if (dead || killed.load()) break;
    uint64_t seq = next_seq.fetch_add(1);
    if (seq >= stop_seq.load() || seq >= records.size()) break;
    Record& rec = records[seq];
    rec.conn = conn;
    rec.send_ns = NowNs();
    auto* r = new Request{seq, &o};
    nbd_completion_callback cb = {.callback = Done, .user_data = r, .free = nullptr};
    if (nbd_aio_pwrite(h, buf.data(), kWriteSize, seq * o.granularity, cb, 0) == -1) {
      // Not submitted: the callback will not run.
      if (!killed.load()) {
        fprintf(stderr, "checkpoint_load: submit: %s\n", nbd_get_error());
        bad = 1;
      }
      rec.status = -1;
      delete r;
      break;
    }
  }
  while (!dead && nbd_aio_in_flight(h) > 0)
    if (nbd_poll(h, -1) == -1) dead = true;
  writers_done.fetch_add(1);
  if (!dead && !killed.load() && nbd_shutdown(h, 0) == -1) {
    fprintf(stderr, "checkpoint_load: shutdown: %s\n", nbd_get_error());
    bad = 1;
  }
  nbd_close(h);  // retires whatever is left (a dead connection's commands)
  return bad;
}

int ConnectControl(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    close(fd);
    errno = ENAMETOOLONG;
    return -1;
  }
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == -1) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

// Reads one line (without '\n') within timeout_ms. False on EOF, error or
// timeout.
bool ReadLine(int fd, std::string& line, int timeout_ms) {
  const int64_t end = NowNs() + int64_t{timeout_ms} * 1000000;
  line.clear();
  char c[4096];
  for (;;) {
    size_t nl = line.find('\n');
    if (nl != std::string::npos) {
      line.resize(nl);
      return true;
    }
    int left = static_cast<int>((end - NowNs()) / 1000000);
    if (left <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    int n = poll(&p, 1, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    ssize_t got = read(fd, c, sizeof c);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    line.append(c, static_cast<size_t>(got));
  }
}

struct Checkpoint {
  int64_t send_ns = 0, reply_ns = 0;
  std::string reply;
  bool ok = false;
};

// Waits for --before acks (or for the writers to give up), sends the
// checkpoint, reads the reply.
void RunControl(const Options& o, int fd, Checkpoint& cp) {
  while (acked.load() < o.before && writers_done.load() < o.threads && !killed.load())
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  if (acked.load() < o.before) {
    fprintf(stderr,
            "checkpoint_load: only %llu writes acknowledged, wanted %llu before the checkpoint\n",
            static_cast<unsigned long long>(acked.load()),
            static_cast<unsigned long long>(o.before));
    stop_seq.store(0);
    return;
  }
  nlohmann::json req = {{"execute", "checkpoint"},
                        {"arguments", {{"freeze", o.freeze}, {"new", o.new_name}}},
                        {"id", 1}};
  std::string line = req.dump() + "\n";
  cp.send_ns = NowNs();
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      perror("checkpoint_load: control socket write");
      stop_seq.store(0);
      return;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (!ReadLine(fd, cp.reply, 30000)) {
    fprintf(stderr, "checkpoint_load: no reply to the checkpoint within 30 s\n");
    stop_seq.store(0);
    return;
  }
  cp.reply_ns = NowNs();
  // Published before the writers are told how far to go on.
  reply_ns.store(cp.reply_ns);
  stop_seq.store(next_seq.load() + o.after);
  auto r = nlohmann::json::parse(cp.reply, nullptr, false);
  cp.ok = r.is_object() && r.contains("return") && r["return"].is_object() &&
          r.value("id", nlohmann::json()) == 1 && !r.contains("error");
  if (!cp.ok) {
    fprintf(stderr, "checkpoint_load: checkpoint failed: %s\n", cp.reply.c_str());
    stop_seq.store(0);
    return;
  }
  if (o.kill_after == 0) KillServer(o);
}

bool WriteLog(const Options& o, const Checkpoint& cp) {
  FILE* f = fopen(o.log.c_str(), "w");
  if (!f) {
    perror(o.log.c_str());
    return false;
  }
  if (cp.send_ns)
    fprintf(f, "C %lld %lld %s\n", static_cast<long long>(cp.send_ns),
            static_cast<long long>(cp.reply_ns), cp.reply.c_str());
  if (kill_ns.load()) fprintf(f, "K %lld\n", static_cast<long long>(kill_ns.load()));
  for (uint64_t k = 0; k < records.size(); ++k) {
    const Record& r = records[k];
    if (r.send_ns == 0) continue;
    fprintf(f, "W %llu %u %llu %llu %lld %lld %d\n", static_cast<unsigned long long>(k), r.conn,
            static_cast<unsigned long long>(k * o.granularity),
            static_cast<unsigned long long>(kWriteSize), static_cast<long long>(r.send_ns),
            static_cast<long long>(r.ack_ns), r.status);
  }
  return fclose(f) == 0;
}

[[noreturn]] void Usage() {
  fprintf(stderr,
          "usage: checkpoint_load --socket NBD-SOCKET --control CONTROL-SOCKET --log FILE\n"
          "                       [--threads N] [--qd N] [--granularity N] [--before N]\n"
          "                       [--after N] [--max-writes N] [--freeze NAME] [--new NAME]\n"
          "                       [--kill-pid PID --kill-after N]\n");
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
    else if (a == "--control")
      o.control = val();
    else if (a == "--log")
      o.log = val();
    else if (a == "--threads")
      o.threads = static_cast<unsigned>(std::stoul(val()));
    else if (a == "--qd")
      o.qd = static_cast<unsigned>(std::stoul(val()));
    else if (a == "--granularity")
      o.granularity = std::stoull(val());
    else if (a == "--before")
      o.before = std::stoull(val());
    else if (a == "--after")
      o.after = std::stoull(val());
    else if (a == "--max-writes")
      o.max_writes = std::stoull(val());
    else if (a == "--freeze")
      o.freeze = val();
    else if (a == "--new")
      o.new_name = val();
    else if (a == "--kill-pid")
      o.kill_pid = static_cast<pid_t>(std::stol(val()));
    else if (a == "--kill-after")
      o.kill_after = std::stoll(val());
    else
      Usage();
  }
  if (o.socket.empty() || o.control.empty() || o.log.empty() || o.threads == 0 || o.qd == 0 ||
      o.granularity < kWriteSize)
    Usage();
  if ((o.kill_pid > 0) != (o.kill_after >= 0)) Usage();  // both or neither

  nbd_handle* h = nbd_create();
  if (!h || nbd_connect_unix(h, o.socket.c_str()) == -1) {
    fprintf(stderr, "checkpoint_load: connect %s: %s\n", o.socket.c_str(), nbd_get_error());
    return 1;
  }
  const int64_t size = nbd_get_size(h);
  const int multi_conn = nbd_can_multi_conn(h);
  nbd_shutdown(h, 0);
  nbd_close(h);
  if (size <= 0) return 1;
  if (o.threads > 1 && multi_conn != 1)
    fprintf(stderr, "checkpoint_load: note: the export does not advertise multi-conn\n");
  uint64_t granules = static_cast<uint64_t>(size) / o.granularity;
  if (o.max_writes == 0 || o.max_writes > granules) o.max_writes = granules;
  if (o.max_writes < o.before + o.after) {
    fprintf(stderr,
            "checkpoint_load: the disk has room for %llu writes, --before + --after is %llu\n",
            static_cast<unsigned long long>(o.max_writes),
            static_cast<unsigned long long>(o.before + o.after));
    return 2;
  }
  records.resize(o.max_writes);

  int ctl = ConnectControl(o.control);
  if (ctl < 0) {
    fprintf(stderr, "checkpoint_load: connect %s: %s\n", o.control.c_str(), strerror(errno));
    return 1;
  }
  std::vector<char> buf(kWriteSize, 'c');
  Checkpoint cp;
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (unsigned c = 0; c < o.threads; ++c)
    threads.emplace_back([&, c] { bad += RunWriter(o, c, buf); });
  std::thread control([&] { RunControl(o, ctl, cp); });
  control.join();
  for (auto& t : threads) t.join();
  close(ctl);
  if (!WriteLog(o, cp)) return 1;

  uint64_t sent = 0, after = 0;
  for (const Record& r : records) {
    if (r.send_ns == 0) continue;
    ++sent;
    if (cp.reply_ns && r.send_ns > cp.reply_ns) ++after;
  }
  fprintf(stderr,
          "checkpoint_load: %llu writes, %llu acknowledged, %llu sent after the reply; "
          "checkpoint round trip %.3f ms%s\n",
          static_cast<unsigned long long>(sent), static_cast<unsigned long long>(acked.load()),
          static_cast<unsigned long long>(after),
          cp.reply_ns ? static_cast<double>(cp.reply_ns - cp.send_ns) / 1e6 : -1.0,
          killed.load() ? "; server killed" : "");
  if (!cp.ok || bad) return 1;
  if (failures_before_kill.load()) {
    fprintf(stderr, "checkpoint_load: %llu writes failed%s\n",
            static_cast<unsigned long long>(failures_before_kill.load()),
            o.kill_pid ? " before the kill" : "");
    return 1;
  }
  if (o.kill_pid && !killed.load()) {
    fprintf(stderr, "checkpoint_load: the writers stopped before the kill point\n");
    return 1;
  }
  return 0;
}
