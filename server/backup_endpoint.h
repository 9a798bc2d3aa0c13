// The qemu:dirty-bitmap endpoint: serves a frozen DirtyBitmap as the NBD
// metadata context "qemu:dirty-bitmap:NAME", which nbdkit 1.32 cannot
// (docs/backup.md). A tiny qcow2 "carrier" holds only the bitmap (disabled)
// and names an external raw data file; qemu-nbd opens it with that data file
// replaced by an NBD connection to the real export, so reads, base:allocation
// and the dirty-bitmap context all come from one standard server:
//
//   qemu-nbd -r -t --fork --pid-file=SOCK.pid -k SOCK -x EXPORT -B NAME
//            -e MAX --cache=writeback --image-opts
//            driver=qcow2,file.driver=file,file.filename=CARRIER,
//            data-file.driver=nbd,data-file.server.type=unix,
//            data-file.server.path=SOURCE[,data-file.export=SOURCE_EXPORT]
//
// The qemu-nbd process is a daemon (it outlives the caller); StopEndpoint
// ends it. Every step is bounded (start_timeout, the stop bounds below).
// Threading: the functions may run from any thread; two calls on the same
// paths at once are not coordinated (the caller serialises per endpoint).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "bitmap/dirty_bitmap.h"
#include "common/status.h"

namespace cbt {

struct EndpointOptions {
  std::string carrier_path;             // the carrier qcow2 to create (must not exist)
  std::string listen_socket;            // qemu-nbd -k PATH (absolute; must not exist)
  std::string export_name = "backup";   // qemu-nbd -x NAME
  std::string source_socket;            // unix socket of the NBD server holding the data
  std::string source_export;            // export name there ("" = default)
  std::string bitmap_name;              // served as qemu:dirty-bitmap:<bitmap_name>
  uint64_t disk_size = 0;               // == bitmap->disk_size() == the source's size
  const DirtyBitmap* bitmap = nullptr;  // the frozen bits (granularity from it); required
  std::string qemu_nbd = "qemu-nbd";    // program (PATH is searched)
  std::chrono::milliseconds start_timeout{10000};  // the whole start, 1 ms .. 10 min
  unsigned max_clients = 8;                        // qemu-nbd -e: clients served at once, 1 .. 1024
};

struct EndpointInfo {
  int pid = 0;           // qemu-nbd's pid (a daemon: not the caller's child)
  std::string uri;       // nbd+unix:///<export>?socket=<listen_socket>
  std::string context;   // "qemu:dirty-bitmap:<bitmap_name>"
  std::string pid_file;  // listen_socket + ".pid"
};

// The carrier's cluster size: one identity-mapped L2 table (2 MiB) covers
// 512 GiB of disk, so the carrier stays about 4 MiB per TiB.
inline constexpr uint32_t kCarrierClusterSize = 2u << 20;
// Our cap on the disk size (QEMU allows more): keeps the carrier, written in
// full at start, under 256 MiB of L2 tables.
inline constexpr uint64_t kMaxEndpointDiskSize = uint64_t{64} << 40;  // 64 TiB
// The absolute path stored in the carrier as its data file. qemu-nbd never
// opens it (--image-opts replaces the data-file child); it must not exist, so
// that opening the carrier without the override fails instead of reading some
// other file. StopEndpoint removes only carriers that name it.
inline constexpr const char* kCarrierPlaceholder =
    "/nonexistent/cbt-backup-endpoint/data-is-served-over-nbd";

// Whether a disk of disk_size bytes with a bitmap of this granularity can be
// served: disk_size a multiple of 512 (qcow2 sizes are) in 512 B ..
// kMaxEndpointDiskSize, granularity a power of two in 512 B .. 2 GiB, and the
// bitmap within qcow2's 512 MiB of bitmap data (2^32 granules).
// Failure: InvalidArgument naming the value, the limit and the fix.
Status ValidateEndpointGeometry(uint64_t disk_size, uint64_t granularity);

// Starts the endpoint:
//  1. checks the options (ValidateEndpointGeometry, paths, names), and that
//     nothing exists at carrier_path, listen_socket or its pid file;
//  2. connects to the source (source_socket, source_export) and checks that
//     its size is disk_size: qemu-nbd would serve zeros past a smaller
//     source's end;
//  3. creates the carrier (cluster size kCarrierClusterSize, data file
//     kCarrierPlaceholder) holding the bitmap as bitmap_name, disabled, not in
//     use;
//  4. runs qemu-nbd (above) with its stderr captured, waits for the forking
//     parent to report the server running;
//  5. checks that the pid file names a qemu-nbd serving listen_socket and
//     that the endpoint answers a handshake with disk_size and the context.
// Returns the endpoint, ready for clients. Failure: a Status naming the step
// (InvalidArgument / AlreadyExists for bad options, the source's error,
// IOError with qemu-nbd's stderr, a timeout as IOError ETIMEDOUT); nothing
// is left behind: no process, carrier, socket or pid file of this call.
Result<EndpointInfo> StartEndpoint(const EndpointOptions& opts);

// Stops the endpoint on listen_socket and removes what StartEndpoint made:
// the qemu-nbd recorded in listen_socket + ".pid" gets SIGTERM, then SIGKILL
// after 5 s (then at most 2 s more), but only while /proc/PID/cmdline shows a
// qemu-nbd serving listen_socket (-k): a reused pid is never signalled. Once
// it has exited, waits up to 5 s more for init to reap it (the daemon is not
// our child: until reaped, a zombie still answers kill(pid, 0)). Then
// the pid file, the socket (if a socket nobody listens on) and the carrier
// (if a qcow2 naming kCarrierPlaceholder) are removed. Idempotent: a missing
// pid file, a dead process, missing files are fine.
// Failure: IOError (the process survived SIGKILL; unlink failed), Busy
// (something else still listens on listen_socket after 2 s: it is left alone),
// InvalidArgument (pid file without a pid; carrier_path is not a carrier:
// not removed).
Status StopEndpoint(const std::string& listen_socket, const std::string& carrier_path);

}  // namespace cbt
