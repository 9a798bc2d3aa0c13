// The operations of `cbt bitmap` (those of `qemu-img bitmap`), applied in
// order to an in-memory copy of an image's bitmap set and then stored with
// ONE qcow2::Image::Commit: several operations in one call take effect all
// together or not at all. Nothing is written before Commit(); an error from
// Apply() leaves the file untouched.
//
// Semantics (qemu-img 7.2 where it has them):
//   add      new bitmap, empty; granularity default = cluster size clamped to
//            4 KiB..64 KiB; enabled unless `disabled`. The name must be free
//            in the working set (a bitmap removed earlier in the same call
//            frees its name).
//   remove   drops the bitmap; the only operation allowed on an inconsistent
//            bitmap (in_use left set by a program that did not close it).
//   clear    all bits clean.
//   enable / disable   sets / clears the "auto" flag (recording).
//   merge    OR of SRC into NAME, across granularities. SRC is read from the
//            working set (so earlier operations of the same call are seen),
//            or from another image when one is given, which must be a disk
//            of the same size (qemu-img refuses other sizes too).
// Threading: one thread (as qcow2::Image).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bitmap/dirty_bitmap.h"
#include "common/status.h"
#include "engine/bitmap_edit.h"
#include "qcow2/image.h"

namespace cbt::cli {

// kPersistent / kTransient (--persistent, --transient) exist only online
// (cbt bitmap --socket: bitmap-set-persistent); every bitmap stored in a file
// is persistent, and BitmapEditor refuses them.
enum class OpKind { kAdd, kRemove, kClear, kEnable, kDisable, kMerge, kPersistent, kTransient };

struct BitmapOp {
  OpKind kind;
  std::string source;  // kMerge: the source bitmap's name
  bool operator==(const BitmapOp&) const = default;
};

// "--add", "--merge SRC": for messages.
std::string OpName(const BitmapOp& op);
// What the operations did, for the result line: "added", "cleared",
// "added, merged from b0" (in the order given).
std::string OpsDone(const std::vector<BitmapOp>& ops);

// Options that apply to every --add / --merge of one call (as in qemu-img).
struct OpOptions {
  std::optional<uint64_t> granularity;  // --add; nullopt: default
  bool add_disabled = false;            // --add --disabled
  bool add_transient = false;           // --add --transient (online only)
};

using ::cbt::DefaultGranularity;
using ::cbt::InconsistentMessage;

// The `cbt bitmap FILE` verbs over the engine's BitmapEditSet (shared with
// the running filter's control socket).
class BitmapEditor {
 public:
  // REQUIRES: img outlives the editor. Starts from img's current set.
  explicit BitmapEditor(qcow2::Image& img);

  // Applies one operation to bitmap `name` in memory. `source_image`: where
  // --merge reads SRC; nullptr = this image's working set.
  // Failure (nothing written): NotFound (bitmap or source missing),
  // AlreadyExists (add), InvalidArgument (bad name/granularity, inconsistent
  // bitmap, too large), Corruption/IOError reading stored data.
  Status Apply(const std::string& name, const BitmapOp& op, const OpOptions& opts,
               qcow2::Image* source_image = nullptr);

  // Stores the working set with one Commit (see qcow2::Image::Commit).
  Status Commit();

  // The working set as it would be committed (for tests and dry runs).
  std::vector<qcow2::BitmapSpec> Specs() { return set_.Specs(); }

 private:
  qcow2::Image& img_;
  BitmapEditSet set_;
};

}  // namespace cbt::cli
