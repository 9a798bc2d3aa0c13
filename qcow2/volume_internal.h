// Internal to qcow2/volume*.cc.
#pragma once

#include <vector>

#include "qcow2/volume.h"

namespace cbt::qcow2 {

// Appends e to out, merging it into the last extent when adjacent and alike.
void AppendExtent(std::vector<Extent>* out, Extent e);

}  // namespace cbt::qcow2
