// Reading and committing a pock_tvm bundle (format pock_tvm.bundle/1, see pock_tvm/runtime/bundle.py).
// A manifest is untrusted input: every field is checked before it is used, with one clear error.
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
  int64_t bound = -1;  // integer values must lie in [0, bound) (token ids into an embedding); -1: any
};

struct Entry : Spec {
  std::string role;  // param | step | state
  size_t offset = 0;
  bool passed = true;      // a runtime argument (false: frozen, folded into the library)
  bool trainable = false;  // updated by train_step
  std::string source;      // the source model's parameter name, for messages
};

// Argument and output names of one compiled function (pock_tvm/calling.py writes them).
struct Signature {
  std::vector<std::string> args, outputs;
};

// Names the calling convention gives the learning-rate argument and the loss output.
inline constexpr const char* kLR = "lr";
inline constexpr const char* kLoss = "loss";

struct Manifest {
  std::string dir, library, state_file;
  std::string target_name, arch, os, device;
  std::vector<Spec> inputs;
  Spec target, output;
  std::vector<Entry> tensors;
  Signature train_step, forward;
  std::string loss;
  double lr = 0.01;
  size_t state_bytes = 0;  // size of the state file
  tvm::ffi::json::Object raw;

  // Index of the tensor named `name`, or -1.
  long Find(const std::string& name) const;
};

size_t DTypeBytes(const std::string& dtype);
DLDataType ParseDType(const std::string& dtype);
std::string ReadFile(const std::string& path);

// Parses dir/manifest.json, checks every field, every file against its SHA-256 and the bundle
// against the machine this runner was built for. Throws Error with the problem and the fix.
Manifest LoadManifest(const std::string& dir);

// Writes `state` (params.bin layout) as a new state file, then points manifest.json at it
// (atomic rename), then removes the old state file: a crash leaves the old or the new state.
void CommitState(Manifest* m, const std::string& state, int64_t steps);

// Holds the bundle's exclusive lock (flock of DIR/.lock, the one pock_tvm takes) while alive;
// throws if another process holds it.
class BundleLock {
 public:
  explicit BundleLock(const std::string& dir);
  ~BundleLock();
  BundleLock(const BundleLock&) = delete;
  BundleLock& operator=(const BundleLock&) = delete;

 private:
  int fd_ = -1;
};

// Removes what a killed writer left: temporary files and state files the manifest no longer names.
void CleanLeftovers(const Manifest& m);

// Architecture and OS this runner was compiled for, as named in target presets.
std::string RunnerArch();
std::string RunnerOS();

}  // namespace pock
