// cbt backup: backups of a running filter (docs/backup.md).
//
//   cbt backup --socket CTL --dir DIR [--full] [--verify]
//       one run: a full backup DIR/000-full.qcow2 the first time, then an
//       incremental DIR/NNN-inc.qcow2 backed by the one before
//   cbt backup begin --socket CTL --new NEW [--freeze OLD] [--nbd-socket PATH]
//   cbt backup end --socket CTL
//       a session for another backup program: the point-in-time export,
//       and with --nbd-socket the qemu:dirty-bitmap endpoint (qemu-nbd)
//
// A run keeps its own bitmaps (cbt-backup-<chain>-<seq>) and a state file
// DIR/cbt-backup.json (the chain id, the layers). The bitmaps are the truth
// about what changed: a run that failed after its checkpoint leaves the
// bitmap it froze disabled, and the next run merges it into the one
// recording, so nothing it would have covered is lost. A layer appears only
// once complete (written as .part, flushed, renamed).

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <filesystem>

#include "qcow2/layer_writer.h"
#include "server/backup_chain.h"
#include "server/backup_copy.h"
#include "server/backup_endpoint.h"
#include "server/cli_parse.h"
#include "server/cli_socket.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// "nbd+unix:///EXPORT?socket=PATH", the export name percent-encoded.
std::string UnixUri(const std::string& export_name, const std::string& socket) {
  std::string e;
  for (unsigned char c : export_name) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      e += static_cast<char>(c);
    } else {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X", c);
      e += buf;
    }
  }
  return "nbd+unix:///" + e + "?socket=" + socket;
}

// The point-in-time export's URI from a backup-begin / query-backup reply,
// or `override` when given.
Result<std::string> ViewUri(const json& session, const std::string& override_uri) {
  if (!override_uri.empty()) return override_uri;
  const auto sockets = session.value("nbd-sockets", json::array());
  if (!sockets.is_array() || sockets.empty() || !sockets[0].is_string())
    return Status::NotFound(
        "the filter cannot tell where nbdkit listens (not a unix socket?): give the backup "
        "export's address with --nbd URI (e.g. nbd://HOST:PORT/" +
        session.value("export", std::string("backup")) + ")");
  return UnixUri(session.value("export", std::string("backup")), sockets[0].get<std::string>());
}

struct RunOptions {
  std::string socket, dir, nbd_uri;
  bool full = false, verify = false;
  unsigned jobs = 8;
  OutputFormat format = OutputFormat::kHuman;
};

// One backup run (see the top). Exit code.
int BackupRun(const RunOptions& o) {
  Result<ChainDir> chain = OpenChainDir(o.dir);
  if (!chain.ok()) return Fail(chain.status());
  const fs::path& dir = chain->dir;
  ChainState& st = chain->state;
  std::error_code ec;

  Result<LiveInfo> live = QueryLive(o.socket);
  if (!live.ok()) return Fail(live.status());
  if (!live->attached) {
    // The filter loads its bitmaps when the first writable client connects
    // (it learns the disk's size then): be that client, once.
    Result<json> q = SocketCall(o.socket, "query-backup");
    const json sockets = q.ok() ? q->value("nbd-sockets", json::array()) : json::array();
    if (!sockets.empty() && sockets[0].is_string())
      (void)TouchExport(UnixUri("", sockets[0].get<std::string>()));
    live = QueryLive(o.socket);
    if (!live.ok()) return Fail(live.status());
  }
  if (!live->attached || !live->disk_size)
    return Fail(
        "the filter has no writable client yet and none could be connected: nothing to back "
        "up (its bitmaps load when the first writable client connects)");
  const uint64_t disk_size = *live->disk_size;
  if (st.disk_size && st.disk_size != disk_size)
    return Fail("the disk has " + std::to_string(disk_size) + " bytes, the chain in " +
                dir.string() + " " + std::to_string(st.disk_size) +
                ": start a new chain in another directory");
  if (st.session) {
    // A run of this chain was killed while its session was open: end it
    // (its frozen bitmap is merged below like any unfinished run's).
    Result<json> q = SocketCall(o.socket, "query-backup");
    if (q.ok() && q->value("active", false) && q->value("id", uint64_t{0}) == st.session) {
      Fail("note: ending backup session " + std::to_string(st.session) +
           " left open by an interrupted run");
      (void)SocketCall(o.socket, "backup-end", {{"id", st.session}});
    }
    st.session = 0;
  }

  std::vector<ChainBitmap> bitmaps;
  for (const LiveBitmap& b : live->bitmaps) bitmaps.push_back({b.name, b.recording, b.consistent});
  Result<RunPlan> planned = PlanRun(st, bitmaps, o.full, dir, live->container.value_or(""));
  if (!planned.ok()) return Fail(planned.status());
  const RunPlan plan = std::move(*planned);
  if (!plan.moved_from.empty())
    std::fprintf(
        stderr,
        "cbt backup: the container moved from %s; the chain goes on (its bitmap '%s' is there)\n",
        plan.moved_from.c_str(), plan.current.c_str());
  const bool full = plan.full;
  const std::string& current = plan.current;
  const std::string& new_name = plan.new_name;
  const std::string& file = plan.file;

  if (!full && !plan.pending.empty()) {
    // Merge what unfinished runs froze into the recording bitmap (they are
    // covered by the backup it freezes now), then drop them: one step.
    json actions = json::array();
    if (!plan.mergeable.empty())
      actions.push_back(
          {{"type", "bitmap-merge"}, {"data", {{"target", current}, {"sources", plan.mergeable}}}});
    for (const std::string& p : plan.pending)
      actions.push_back({{"type", "bitmap-remove"}, {"data", {{"name", p}}}});
    Result<json> m = SocketCall(o.socket, "transaction", {{"actions", actions}});
    if (!m.ok()) return Fail(m.status().message() + " (merging the bitmaps of unfinished runs)");
    st.pending.clear();
  }

  // The checkpoint, announced first: a run killed right after it is adopted.
  st.starting = new_name;
  if (Status s = SaveState(dir, st); !s.ok()) return Fail(s);
  json begin_args = {{"new", new_name}};
  if (!full) begin_args["freeze"] = current;
  Result<json> begun = SocketCall(o.socket, "backup-begin", begin_args);
  if (!begun.ok()) return Fail(begun.status());
  const uint64_t session = begun->value("id", uint64_t{0});
  const int64_t now = UnixNow();
  Started(st, plan);
  st.disk_size = disk_size;
  st.session = session;
  const fs::path part = dir / (file + ".part");

  // From here on a failure ends the session; the chain stays as it was.
  auto abort_run = [&](const Status& s) {
    // A broken session is the likely cause of a failed read: say why.
    std::string why;
    if (Result<json> q = SocketCall(o.socket, "query-backup");
        q.ok() && q->value("id", uint64_t{0}) == session && q->contains("broken") &&
        (*q)["broken"].is_string())
      why = "the backup session broke: " + (*q)["broken"].get<std::string>() + "; ";
    if (SocketCall(o.socket, "backup-end", {{"id", session}}).ok()) st.session = 0;
    fs::remove(part, ec);
    (void)SaveState(dir, st);
    return Fail(why + s.message() + " (no backup made; the chain in " + dir.string() +
                " is unchanged and the next run covers these changes too)");
  };
  if (Status s = SaveState(dir, st); !s.ok()) return abort_run(s);
  Result<std::string> uri = ViewUri(*begun, o.nbd_uri);
  if (!uri.ok()) return abort_run(uri.status());

  std::vector<ByteRange> ranges;
  uint64_t dirty_bytes = 0;
  if (full) {
    Result<std::vector<ByteRange>> a = AllocatedRanges(*uri, disk_size);
    if (!a.ok()) return abort_run(a.status());
    ranges = std::move(*a);
  } else {
    Result<std::vector<Extent>> ex = FetchExtents(o.socket, current);
    if (!ex.ok()) return abort_run(ex.status());
    ranges = DirtyRanges(*ex, dirty_bytes);
  }
  ranges = AlignRanges(std::move(ranges), kLayerCluster, disk_size);
  uint64_t total = 0;
  for (const ByteRange& r : ranges) total += r.length;

  auto writer = OpenLayer(part, disk_size, full ? std::string() : st.layers.back().file);
  if (!writer.ok()) return abort_run(writer.status());
  Progress progress(total, o.format == OutputFormat::kHuman);
  CopyOptions co;
  co.in_flight = o.jobs;
  co.progress = [&](uint64_t done) { progress.Update(done); };
  const auto t0 = std::chrono::steady_clock::now();
  Status s = CopyRanges(*uri, disk_size, ranges, **writer, co);
  progress.Done();
  if (s.ok()) s = (*writer)->Finish();
  if (!s.ok()) return abort_run(s);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fs::rename(part, dir / file, ec);
  if (ec) return abort_run(Status::IOError("rename " + part.string() + ": " + ec.message()));
  if (Status d = SyncDir(dir); !d.ok()) return abort_run(d);

  if (o.verify) {
    // qemu-img compares the whole chain with the point-in-time view.
    if (Status v = VerifyLayer(dir / file, *uri); !v.ok()) {
      if (v.kind() != Status::Kind::kCorruption) return abort_run(v);
      if (SocketCall(o.socket, "backup-end", {{"id", session}}).ok()) st.session = 0;
      (void)SaveState(dir, st);
      return Fail(v.message() +
                  VerifyMismatchFix(plan, st, dir, live->container.value_or("CONTAINER"), ""));
    }
  }
  // The layer is in the chain first; then the session ends and the bitmaps
  // it covers go (a kill in between leaves them frozen: the next run merges
  // them, a superset, and ends the session).
  st.layers.push_back({file, full ? "full" : "inc", full ? "" : current,
                       (*writer)->data_clusters() * kLayerCluster, now});
  if (Status w = SaveState(dir, st); !w.ok())
    return Fail(w.message() + " (the layer " + file + " is complete)");
  Result<json> ended = SocketCall(o.socket, "backup-end", {{"id", session}});
  if (!ended.ok()) Fail("warning: " + ended.status().message() + " (the backup is complete)");
  st.session = 0;
  // What this run froze or replaced is covered now.
  std::vector<std::string> kept;
  for (const std::string& b : st.pending)
    if (Result<json> r = SocketCall(o.socket, "bitmap-remove", {{"name", b}});
        !r.ok() && r.status().kind() != Status::Kind::kNotFound) {
      Fail("warning: " + r.status().message() + " (left for the next run to remove)");
      kept.push_back(b);
    }
  st.pending = kept;
  if (Status w = SaveState(dir, st); !w.ok()) Fail("warning: " + w.message());

  if (o.format == OutputFormat::kJson) {
    PrintJson({{"file", (dir / file).string()},
               {"type", full ? "full" : "incremental"},
               {"reason", full ? Json(plan.why_full) : Json()},
               {"backing-file", full ? Json() : Json(st.layers[st.layers.size() - 2].file)},
               {"bitmap", new_name},
               {"frozen", full ? Json() : Json(current)},
               {"disk-size", disk_size},
               {"dirty-bytes", full ? Json() : Json(dirty_bytes)},
               {"bytes-read", total},
               {"data-clusters", (*writer)->data_clusters()},
               {"zero-clusters", (*writer)->zero_clusters()},
               {"seconds", secs},
               {"verified", o.verify},
               {"session", session},
               // Blocks the disk's writes preserved for this backup while it ran.
               {"preserved-blocks",
                ended.ok() ? Json(ended->value("copied-blocks", uint64_t{0})) : Json()}});
  } else {
    std::printf("%s: %s backup (%s), %s read in %.1f s%s\n", (dir / file).c_str(),
                full ? "full" : "incremental",
                full ? plan.why_full.c_str()
                     : ("changes since " + st.layers[st.layers.size() - 2].file).c_str(),
                HumanSize(total).c_str(), secs, o.verify ? ", verified" : "");
  }
  return kExitOk;
}

constexpr char kRunSynopsis[] =
    "cbt backup --socket CTL --dir DIR [--full] [--verify] [--nbd URI] [--jobs N]\n"
    "       cbt backup --disk DISK --container FILE --dir DIR [--full] [--verify]\n"
    "       cbt backup begin --socket CTL [--freeze OLD | --full-session] [--new NEW]\n"
    "                        [--nbd-socket PATH]\n"
    "       cbt backup end --socket CTL [--id N] [--nbd-socket PATH]";
constexpr char kRunDescription[] =
    "Backs up the disk of the filter serving control socket CTL while it runs.\n"
    "The first run writes a full backup DIR/000-full.qcow2, each later run an\n"
    "incremental DIR/NNN-inc.qcow2 holding what changed since the run before,\n"
    "backed by it: 'qemu-img convert -O raw DIR/<last>.qcow2 disk.raw' (or\n"
    "'cbt restore DIR --to disk.raw') gives the disk as it was at that backup.\n"
    "The disk keeps taking writes: the backup reads the point-in-time export.\n"
    "A run that fails leaves the chain as it was; the next one covers its\n"
    "changes too. --verify compares the chain with the point-in-time view.\n"
    "With --disk and --container instead of --socket, the same offline, when no\n"
    "server runs: the raw DISK and its bitmaps' container FILE.\n"
    "\n"
    "'backup begin' only starts a session for another backup program and prints\n"
    "the point-in-time export's NBD URI; with --nbd-socket PATH it also serves\n"
    "it with the frozen bitmap OLD as the NBD metadata context\n"
    "qemu:dirty-bitmap:OLD (qemu-nbd on PATH). 'backup end' ends the session.";

int BackupBegin(const std::string& socket, const std::string& new_name, const std::string& freeze,
                const std::string& nbd_socket, const std::string& nbd_uri, OutputFormat format) {
  std::error_code ec;
  if (!nbd_socket.empty() && fs::exists(nbd_socket, ec))
    return Fail("--nbd-socket " + nbd_socket +
                " exists: an endpoint left running (stop it with 'cbt backup end --socket " +
                socket + " --nbd-socket " + nbd_socket + "'), or another file");
  json args = {{"new", new_name}};
  if (!freeze.empty()) args["freeze"] = freeze;
  Result<json> begun = SocketCall(socket, "backup-begin", args);
  if (!begun.ok()) return Fail(begun.status());
  const uint64_t id = begun->value("id", uint64_t{0});
  // A failure after the checkpoint undoes it as well, in one step: NEW's
  // bits go back into OLD, which records again, and NEW goes. So a retry
  // starts from where it started.
  auto end_session = [&](const Status& s) {
    (void)SocketCall(socket, "backup-end", {{"id", id}});
    json actions = json::array();
    if (!freeze.empty()) {
      actions.push_back(
          {{"type", "bitmap-merge"}, {"data", {{"target", freeze}, {"sources", {new_name}}}}});
      actions.push_back({{"type", "bitmap-enable"}, {"data", {{"name", freeze}}}});
    }
    actions.push_back({{"type", "bitmap-remove"}, {"data", {{"name", new_name}}}});
    Result<json> undo = SocketCall(socket, "transaction", {{"actions", actions}});
    if (!undo.ok())
      return Fail(s.message() + " (the session was ended; undoing the checkpoint failed: " +
                  undo.status().message() + "; " +
                  (freeze.empty() ? "" : freeze + " is frozen and ") + new_name + " records)");
    return Fail(s.message() + " (nothing was changed: the session and its checkpoint were undone)");
  };
  Result<std::string> uri = ViewUri(*begun, nbd_uri);
  std::string context = "base:allocation";
  std::string served = uri.ok() ? *uri : std::string();
  if (!nbd_socket.empty()) {
    if (!uri.ok()) return end_session(uri.status());
    const auto sockets = begun->value("nbd-sockets", json::array());
    if (sockets.empty())
      return end_session(Status::NotFound("the endpoint needs nbdkit's unix socket"));
    Result<LiveInfo> live = QueryLive(socket);
    if (!live.ok()) return end_session(live.status());
    const LiveBitmap* b = live->Find(freeze);
    if (!b || !live->disk_size) return end_session(Status::NotFound("bitmap '" + freeze + "'"));
    Result<std::vector<Extent>> ex = FetchExtents(socket, freeze);
    if (!ex.ok()) return end_session(ex.status());
    auto bits = DirtyBitmap::Create(*live->disk_size, b->granularity);
    if (!bits.ok()) return end_session(bits.status());
    for (const Extent& e : *ex)
      if (e.dirty) (void)(*bits)->Mark(e.offset, e.length);
    EndpointOptions eo;
    eo.listen_socket = fs::absolute(nbd_socket).string();
    eo.carrier_path = eo.listen_socket + ".carrier.qcow2";
    eo.source_socket = sockets[0].get<std::string>();
    eo.source_export = begun->value("export", std::string("backup"));
    eo.bitmap_name = freeze;
    eo.disk_size = *live->disk_size;
    eo.bitmap = bits->get();
    Result<EndpointInfo> ep = StartEndpoint(eo);
    if (!ep.ok()) return end_session(ep.status());
    Result<json> set = SocketCall(socket, "backup-set-endpoint",
                                  {{"id", id},
                                   {"pid", ep->pid},
                                   {"uri", ep->uri},
                                   {"socket", eo.listen_socket},
                                   {"carrier", eo.carrier_path},
                                   {"context", ep->context}});
    if (!set.ok()) {
      (void)StopEndpoint(eo.listen_socket, eo.carrier_path);
      return end_session(set.status());
    }
    served = ep->uri;
    context = ep->context;
  }
  if (format == OutputFormat::kJson) {
    PrintJson({{"id", id},
               {"uri", served.empty() ? Json() : Json(served)},
               {"context", context},
               {"frozen", freeze.empty() ? Json() : Json(freeze)},
               {"new", new_name},
               {"export", begun->value("export", std::string("backup"))},
               {"disk-size", begun->value("disk-size", uint64_t{0})}});
  } else {
    std::printf(
        "backup session %" PRIu64 " begun%s\n", id,
        freeze.empty() ? "" : (": " + freeze + " frozen, " + new_name + " recording").c_str());
    if (!served.empty())
      std::printf("uri: %s\n", served.c_str());
    else
      std::printf("uri: unknown (%s)\n", uri.status().message().c_str());
    std::printf("context: %s\n", context.c_str());
  }
  return kExitOk;
}

int BackupEnd(const std::string& socket, std::optional<uint64_t> id, const std::string& nbd_socket,
              OutputFormat format) {
  json args = json::object();
  if (id) args["id"] = *id;
  Result<json> ended = SocketCall(socket, "backup-end", args);
  bool stopped = false;
  if (!ended.ok()) {
    // No session (the server restarted?): an endpoint named here is stale.
    if (nbd_socket.empty()) return Fail(ended.status());
    const std::string path = fs::absolute(nbd_socket).string();
    if (Status s = StopEndpoint(path, path + ".carrier.qcow2"); !s.ok()) return Fail(s);
    if (format == OutputFormat::kJson)
      PrintJson({{"id", Json()}, {"endpoint-stopped", true}});
    else
      std::printf("no backup session was open; the endpoint on %s is stopped\n", path.c_str());
    return kExitOk;
  }
  const json ep = ended->value("endpoint", json());
  if (ep.is_object()) {
    Status s = StopEndpoint(ep.value("socket", std::string()), ep.value("carrier", std::string()));
    if (!s.ok()) return Fail(s.message() + " (the session has ended)");
    stopped = true;
  }
  if (format == OutputFormat::kJson) {
    PrintJson({{"id", ended->value("id", uint64_t{0})},
               {"broken", ended->value("broken", json())},
               {"copied-blocks", ended->value("copied-blocks", uint64_t{0})},
               {"stored-bytes", ended->value("stored-bytes", uint64_t{0})},
               {"endpoint-stopped", stopped}});
  } else {
    const json broken = ended->value("broken", json());
    std::printf("backup session %" PRIu64 " ended%s%s\n", ended->value("id", uint64_t{0}),
                broken.is_string() ? (", broken: " + broken.get<std::string>()).c_str() : "",
                stopped ? "; endpoint stopped" : "");
  }
  return kExitOk;
}

}  // namespace

int RunBackup(const std::vector<std::string>& all_args) {
  std::string verb;
  std::vector<std::string> args = all_args;
  if (!args.empty() && (args[0] == "begin" || args[0] == "end")) {
    verb = args[0];
    args.erase(args.begin());
  }
  CommonOptions common;
  RunOptions o;
  std::string new_name, freeze, nbd_socket, disk, container;
  uint64_t id = 0;
  po::options_description desc("Options");
  desc.add_options()("socket", po::value(&o.socket)->value_name("CTL"),
                     "the filter's control socket (cbt-control=CTL): online runs, begin, end")(
      "dir", po::value(&o.dir)->value_name("DIR"), "the backup chain's directory (backup runs)")(
      "disk", po::value(&disk)->value_name("DISK"), "offline: the raw disk (no server runs)")(
      "container", po::value(&container)->value_name("FILE"),
      "offline: the qcow2 container holding DISK's bitmaps")(
      "full", po::bool_switch(&o.full), "make a full backup even if an incremental could be made")(
      "verify", po::bool_switch(&o.verify),
      "compare the chain with the point-in-time view afterwards (needs qemu-img)")(
      "nbd", po::value(&o.nbd_uri)->value_name("URI"),
      "the point-in-time export's NBD URI (default: found from the filter)")(
      "jobs", po::value(&o.jobs)->value_name("N"), "NBD reads in flight (default 8)")(
      "new", po::value(&new_name)->value_name("NEW"),
      "begin: the bitmap that starts recording (default: OLD-<unix time>)")(
      "freeze", po::value(&freeze)->value_name("OLD"),
      "begin: the recording bitmap to freeze, whose changes the backup reads (default: "
      "the one persistent bitmap that records)")(
      "full-session", "begin: freeze nothing (a full backup); NEW is added")(
      "nbd-socket", po::value(&nbd_socket)->value_name("PATH"),
      "begin: serve qemu:dirty-bitmap:OLD with qemu-nbd on unix socket PATH; end: stop the "
      "endpoint on PATH even when no session is open (after a restart of the server)")(
      "id", po::value(&id)->value_name("N"), "end: the session to end (default: the open one)");
  AddExportOption(desc);
  std::vector<std::string> files;
  po::variables_map vm;
  if (ParseCommand(args, desc, common, files, kRunSynopsis, kRunDescription, &vm)) return kExitOk;
  o.format = common.format();
  if (!files.empty()) throw UsageError("unexpected argument '" + files[0] + "'");
  if (!disk.empty() || !container.empty()) {
    if (!verb.empty())
      throw UsageError("backup " + verb + " works on a running filter: --socket CTL");
    if (!o.socket.empty())
      throw UsageError("--socket and --disk/--container together: online or offline, not both");
    if (disk.empty() || container.empty())
      throw UsageError("offline needs both --disk DISK and --container FILE");
    if (o.dir.empty()) throw UsageError("missing --dir DIR (where the backup chain goes)");
    if (!o.nbd_uri.empty() || vm.count("jobs"))
      throw UsageError("--nbd and --jobs are for online runs (--socket)");
    return BackupOffline(disk, container, o.dir, o.full, o.verify, o.format);
  }
  if (o.socket.empty())
    throw UsageError(
        "missing --socket CTL (the filter's control socket; offline: --disk and --container)");
  if (verb == "begin") {
    if (!freeze.empty() && vm.count("full-session"))
      throw UsageError("backup begin: --freeze and --full-session together");
    if (freeze.empty() && !vm.count("full-session")) {
      // The usual case: one bitmap records; it is the one to freeze.
      Result<LiveInfo> live = QueryLive(o.socket);
      if (!live.ok()) return Fail(live.status());
      std::vector<std::string> recording;
      for (const LiveBitmap& b : live->bitmaps)
        if (b.recording && b.persistent && b.consistent) recording.push_back(b.name);
      if (recording.size() != 1)
        throw UsageError("backup begin: " + std::to_string(recording.size()) +
                         " persistent bitmaps record: name the one to freeze with --freeze OLD" +
                         (live->attached ? "" : " (the filter has no writable client yet)"));
      freeze = recording[0];
    }
    if (new_name.empty()) {
      new_name = freeze.empty() ? "backup" : freeze;
      new_name += "-" + std::to_string(UnixNow());
    }
    if (!nbd_socket.empty() && freeze.empty())
      throw UsageError("backup begin: --nbd-socket serves the frozen bitmap: give --freeze OLD");
    return BackupBegin(o.socket, new_name, freeze, nbd_socket, o.nbd_uri, o.format);
  }
  if (verb == "end")
    return BackupEnd(o.socket, vm.count("id") ? std::optional<uint64_t>(id) : std::nullopt,
                     nbd_socket, o.format);
  if (!new_name.empty() || !freeze.empty() || !nbd_socket.empty() || vm.count("id") ||
      vm.count("full-session"))
    throw UsageError(
        "--new, --freeze, --full-session, --nbd-socket and --id are for 'backup begin/end'");
  if (o.dir.empty()) throw UsageError("missing --dir DIR (where the backup chain goes)");
  if (o.jobs < 1 || o.jobs > 64) throw UsageError("--jobs must be from 1 to 64");
  return BackupRun(o);
}

}  // namespace cbt::cli
