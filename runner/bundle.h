// Reading and committing a pock_tvm bundle (format pock_tvm.bundle/1, see pock_tvm/runtime/bundle.py).
#pragma once

#include <tvm/ffi/extra/json.h>

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace pock {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
  size_t nbytes = 0;
};

struct Entry : Spec {
  std::string role;  // param | step | state
  size_t offset = 0;
  bool passed = true;      // a runtime argument (false: frozen, folded into the library)
  bool trainable = false;  // updated by train_step
};

struct Manifest {
  std::string dir, library, state_file;
  std::string target_name, arch, os, device;
  std::vector<Spec> inputs;
  Spec target, output;
  std::vector<Entry> tensors;
  std::string loss;
  double lr = 0.01;
  tvm::ffi::json::Object raw;
};

size_t DTypeBytes(const std::string& dtype);
DLDataType ParseDType(const std::string& dtype);
std::string ReadFile(const std::string& path);

// Parses dir/manifest.json and checks every file against its SHA-256 and the bundle against
// the machine this runner was built for. Throws Error with the problem and the fix.
Manifest LoadManifest(const std::string& dir);

// Writes `state` (params.bin layout) as a new state file, then points manifest.json at it
// (atomic rename), then removes the old state file: a crash leaves the old or the new state.
void CommitState(Manifest* m, const std::string& state, int64_t steps);

// Architecture and OS this runner was compiled for, as named in target presets.
std::string RunnerArch();
std::string RunnerOS();

}  // namespace pock
