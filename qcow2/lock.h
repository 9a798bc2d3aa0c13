// QEMU-compatible image locking with Linux OFD byte-range locks.
//
// QEMU (block/file-posix.c raw_apply_lock_bytes) holds a shared (read) lock
// on byte 100+p for each permission p it uses and on byte 200+p for each
// permission it refuses to share; p: 0 consistent read, 1 write,
// 2 write-unchanged, 3 resize. A writable QEMU holds 100,101,103,201,203; a
// read-only one 100,201,203. Conflicts are found by testing an exclusive
// lock with F_OFD_GETLK: someone holds p (100+p) that we refuse to share, or
// someone refuses (200+p) a p we want. We take exactly QEMU's bytes, so
// qemu-img refuses a file we hold for writing and we refuse one QEMU holds.
//
// OFD locks belong to the open file description: they go away when the last
// descriptor of it is closed (e.g. when the PosixFile is destroyed).
// Threading: plain functions; the kernel serialises.
#pragma once

#include <string>

#include "common/status.h"

namespace cbt::qcow2 {

enum class LockMode {
  kReadOnly,   // like qemu-img info: 100, 201, 203
  kReadWrite,  // like qemu-nbd: 100, 101, 103, 201, 203
  // like qemu-img info -U (force-share): 100 only, shares everything, so a
  // writer may hold the file; refused only by a holder of 200.
  kForceShare,
};

// Tests for conflicting holders, then takes the locks on fd (opened on
// path). Failure: Busy naming the file and what the other holder does
// ("another process has it open for writing"); IOError (errno) if the
// kernel refuses the calls.
Status LockImage(int fd, const std::string& path, LockMode mode);

// Drops every lock byte we may hold on fd (100..299). IOError on failure.
Status UnlockImage(int fd, const std::string& path);

}  // namespace cbt::qcow2
