// BlockIO: the only way the core libraries touch storage.
//
// Byte-addressed, like a block device or SQLite's file methods. Three
// implementations: PosixFile (tools, tests, external containers), MemBlockIO
// (unit tests, fuzzing), and later the nbdkit plugin layer for internal
// bitmaps. Test decorators (fault injection, power-cut simulation) wrap any of
// them.
//
// Durability levels (they map onto cbt-durability=process and =power):
//  - pwrite() returning OK: the bytes are handed to the layer below (for a
//    file, the page cache). They survive the death of this process, not a
//    power cut.
//  - flush() returning OK: every pwrite that returned before flush() was
//    called is durable.
//
// Threading: every implementation allows concurrent calls from several
// threads. Overlapping concurrent writes land in an unspecified order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "common/status.h"

namespace cbt {

class BlockIO {
 public:
  virtual ~BlockIO() = default;

  // Reads exactly out.size() bytes at offset. A read that reaches past the
  // end returns OutOfRange (never silent zeros): the caller decides what a
  // truncated file means.
  virtual Status pread(std::span<std::byte> out, uint64_t offset) = 0;
  // Writes all of in at offset, extending the size if needed.
  virtual Status pwrite(std::span<const std::byte> in, uint64_t offset) = 0;
  // Makes all completed writes durable (see above).
  virtual Status flush() = 0;
  virtual Result<uint64_t> size() = 0;
  // Grows or shrinks to new_size; grown bytes read as zeros.
  virtual Status resize(uint64_t new_size) = 0;
  // A name for messages (a path, or "memory").
  virtual const char* name() const = 0;

  // Optional, for the qcow2 data path (defaults: not supported / all data).
  // Deallocates [offset, offset+len) inside the file; it then reads as zeros
  // and the size is unchanged. NotSupported if the layer cannot.
  virtual Status punch_hole(uint64_t offset, uint64_t len);
  // The run of [offset, offset+max_len) that starts at offset: whether it is
  // a hole (reads zero, no storage) and its length (>= 1, <= max_len).
  // Past the end of the file counts as a hole.
  struct Run {
    bool hole = false;
    uint64_t length = 0;
  };
  virtual Result<Run> probe_run(uint64_t offset, uint64_t max_len);
  // Bytes of storage the file occupies (st_blocks); default: size().
  virtual Result<uint64_t> allocated_bytes();
};

}  // namespace cbt
