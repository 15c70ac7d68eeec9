// pock_runner: runs a pock_tvm training bundle on the device, with the TVM runtime and no Python.
//
//   pock_runner info  BUNDLE
//   pock_runner train BUNDLE DATA [--steps N] [--lr LR] [--no-save]
//   pock_runner eval  BUNDLE DATA
//   pock_runner serve [--port 9090] [--dir WORKDIR]   (TVM RPC server, see serve.cc)
//
// DATA holds whole batches back to back: for each batch the inputs, then the target, each as
// raw little-endian C-order bytes with the shapes and dtypes of manifest.json (`pock-tvm pack-data`).
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bundle.h"

namespace ffi = tvm::ffi;
using pock::Entry;
using pock::Error;
using pock::Manifest;
using pock::Spec;

namespace pock {
int Serve(int port, const std::string& workdir);
}

namespace {

struct Runtime {
  DLDevice dev{kDLCPU, 0};
  ffi::Function alloc = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
  ffi::Function to_dev = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes");
  ffi::Function to_host = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyToBytes");

  ffi::Tensor Put(const Spec& spec, const char* bytes) const {
    ffi::Shape shape(spec.shape);
    ffi::Tensor t = alloc(shape, pock::ParseDType(spec.dtype), dev, nullptr).cast<ffi::Tensor>();
    to_dev(t, static_cast<void*>(const_cast<char*>(bytes)), static_cast<int64_t>(spec.nbytes));
    return t;
  }

  std::string Get(const ffi::Tensor& t, size_t nbytes) const {
    std::string out(nbytes, '\0');
    to_host(t, static_cast<void*>(out.data()), static_cast<int64_t>(nbytes));
    return out;
  }
};

struct Session {
  Manifest m;
  Runtime rt;
  ffi::Optional<ffi::Module> vm_holder;
  std::string state;                 // params.bin bytes as loaded
  std::vector<ffi::Tensor> tensors;  // one per manifest entry (empty for folded ones)

  explicit Session(const std::string& dir) : m(pock::LoadManifest(dir)) {
    if (m.device == "cuda" && !dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL)) {
      throw Error(std::string("cannot load libtvm_runtime_cuda.so (ship it beside the runner; it needs "
                              "the CUDA driver and libcudart of the device): ") + dlerror());
    }
    std::string lib = m.dir + "/" + m.library;
    if (lib[0] != '/') lib = "./" + lib;  // a bare name would go through the library search path
    ffi::Module exec = ffi::Module::LoadFromFile(lib);
    vm_holder = exec->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    ffi::Module vm = vm_holder.value();
    if (m.device == "cuda") {
      rt.dev = DLDevice{kDLCUDA, 0};
      vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCUDA), 0, 2,
                                                   static_cast<int>(kDLCPU), 0, 2);
    } else {
      vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    }
    state = pock::ReadFile(m.dir + "/" + m.state_file);
    for (const Entry& e : m.tensors) {
      if (e.offset + e.nbytes > state.size()) throw Error(m.state_file + " is shorter than manifest.json says");
      tensors.push_back(e.passed ? rt.Put(e, state.data() + e.offset) : ffi::Tensor());
    }
  }

  // Manifest positions of the passed (non-folded) tensors of one role, in call order.
  std::vector<size_t> Indices(const char* role) const {
    std::vector<size_t> out;
    for (size_t i = 0; i < m.tensors.size(); ++i) {
      if (m.tensors[i].role == role && m.tensors[i].passed) out.push_back(i);
    }
    return out;
  }

  ffi::Any Call(const char* name, const std::vector<ffi::Any>& args) {
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any rv;
    vm_holder.value()->GetFunction(name).value().CallPacked(views.data(), static_cast<int32_t>(views.size()), &rv);
    return rv;
  }

  std::string CurrentState() const {
    std::string out = state;
    for (size_t i = 0; i < m.tensors.size(); ++i) {
      const Entry& e = m.tensors[i];
      if (e.passed) {
        std::string bytes = rt.Get(tensors[i], e.nbytes);
        std::memcpy(out.data() + e.offset, bytes.data(), e.nbytes);
      }
    }
    return out;
  }
};

struct Data {
  std::string bytes;
  size_t batch_bytes = 0, batches = 0;
};

Data LoadData(const Manifest& m, const std::string& path) {
  Data d;
  d.bytes = pock::ReadFile(path);
  for (const Spec& s : m.inputs) d.batch_bytes += s.nbytes;
  d.batch_bytes += m.target.nbytes;
  d.batches = d.bytes.size() / d.batch_bytes;
  if (d.batches == 0 || d.bytes.size() % d.batch_bytes != 0) {
    throw Error("data file '" + path + "' has " + std::to_string(d.bytes.size()) +
                " bytes, not a whole number of batches of " + std::to_string(d.batch_bytes) +
                " bytes (inputs then target, shapes of manifest.json); write it with `pock-tvm pack-data`");
  }
  return d;
}

std::vector<ffi::Tensor> Batch(const Session& s, const Data& d, size_t index, ffi::Tensor* target) {
  const char* p = d.bytes.data() + (index % d.batches) * d.batch_bytes;
  std::vector<ffi::Tensor> inputs;
  for (const Spec& spec : s.m.inputs) {
    inputs.push_back(s.rt.Put(spec, p));
    p += spec.nbytes;
  }
  *target = s.rt.Put(s.m.target, p);
  return inputs;
}

// Linux: KiB of a /proc/self/status field (0 elsewhere). ResetPeak makes VmHWM cover what follows.
long StatusKiB(const char* field) {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  long value = 0;
  size_t n = std::strlen(field);
  while (std::fgets(line, sizeof(line), f)) {
    if (std::strncmp(line, field, n) == 0 && line[n] == ':') value = std::atol(line + n + 1);
  }
  std::fclose(f);
  return value;
}

void ResetPeak() {
  FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f) {
    std::fputs("5", f);
    std::fclose(f);
  }
}

float Scalar(const Runtime& rt, const ffi::Tensor& t) {
  std::string b = rt.Get(t, sizeof(float));
  float v;
  std::memcpy(&v, b.data(), sizeof(float));
  return v;
}

int Train(const std::string& dir, const std::string& data_path, int steps, double lr, bool save) {
  Session s(dir);
  Data d = LoadData(s.m, data_path);
  if (steps <= 0) steps = static_cast<int>(d.batches);
  if (lr <= 0) lr = s.m.lr;
  std::vector<size_t> params = s.Indices("param"), states = s.Indices("state");
  size_t step_index = s.Indices("step")[0];
  std::vector<size_t> trainable;
  for (size_t i : params) {
    if (s.m.tensors[i].trainable) trainable.push_back(i);
  }
  float lr_value = static_cast<float>(lr);
  ffi::Tensor lr_t = s.rt.Put(Spec{"lr", {}, "float32", 4}, reinterpret_cast<const char*>(&lr_value));
  double total_ms = 0;
  ResetPeak();
  long base_kib = StatusKiB("VmRSS");
  for (int i = 0; i < steps; ++i) {
    ffi::Tensor target;
    std::vector<ffi::Tensor> inputs = Batch(s, d, static_cast<size_t>(i), &target);
    std::vector<ffi::Any> args(inputs.begin(), inputs.end());
    for (size_t p : params) args.push_back(s.tensors[p]);
    args.push_back(target);
    args.push_back(lr_t);
    args.push_back(s.tensors[step_index]);
    for (size_t k : states) args.push_back(s.tensors[k]);
    auto start = std::chrono::steady_clock::now();
    ffi::Array<ffi::Any> out = s.Call("train_step", args).cast<ffi::Array<ffi::Any>>();
    float loss = Scalar(s.rt, out[0].cast<ffi::Tensor>());  // waits for the step to finish
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    total_ms += ms;
    size_t o = 1;
    for (size_t p : trainable) s.tensors[p] = out[o++].cast<ffi::Tensor>();
    s.tensors[step_index] = out[o++].cast<ffi::Tensor>();
    for (size_t k : states) s.tensors[k] = out[o++].cast<ffi::Tensor>();
    std::printf("step %d loss %.7g time_ms %.3f\n", i + 1, loss, ms);
    if (!std::isfinite(loss)) throw Error("loss is not finite at step " + std::to_string(i + 1) +
                                          "; lower the learning rate (--lr); parameters not saved");
  }
  std::printf("steps %d mean_time_ms %.3f\n", steps, total_ms / steps);
  std::printf("memory loaded_kib %ld train_peak_kib %ld\n", base_kib, StatusKiB("VmHWM") - base_kib);
  if (save) {
    int64_t done = static_cast<int64_t>(std::lround(Scalar(s.rt, s.tensors[step_index])));
    pock::CommitState(&s.m, s.CurrentState(), done);
    std::printf("saved %s/%s\n", dir.c_str(), s.m.state_file.c_str());
  }
  return 0;
}

int Eval(const std::string& dir, const std::string& data_path) {
  Session s(dir);
  Data d = LoadData(s.m, data_path);
  size_t correct = 0, count = 0;
  double sq = 0;
  for (size_t b = 0; b < d.batches; ++b) {
    ffi::Tensor target;
    std::vector<ffi::Tensor> inputs = Batch(s, d, b, &target);
    std::vector<ffi::Any> args(inputs.begin(), inputs.end());
    for (size_t p : s.Indices("param")) args.push_back(s.tensors[p]);
    ffi::Tensor logits = s.Call("forward", args).cast<ffi::Tensor>();
    std::string out = s.rt.Get(logits, s.m.output.nbytes);
    const float* y = reinterpret_cast<const float*>(out.data());
    const char* t = d.bytes.data() + b * d.batch_bytes + (d.batch_bytes - s.m.target.nbytes);
    if (s.m.loss == "cross_entropy" && s.m.output.shape.size() == 2) {
      int64_t n = s.m.output.shape[0], c = s.m.output.shape[1];
      const int64_t* labels = reinterpret_cast<const int64_t*>(t);
      for (int64_t i = 0; i < n; ++i) {
        int64_t best = 0;
        for (int64_t j = 1; j < c; ++j) best = y[i * c + j] > y[i * c + best] ? j : best;
        correct += best == labels[i];
        ++count;
      }
    } else {
      const float* want = reinterpret_cast<const float*>(t);
      size_t n = s.m.output.nbytes / sizeof(float);
      for (size_t i = 0; i < n; ++i) sq += (y[i] - want[i]) * (y[i] - want[i]);
      count += n;
    }
  }
  if (s.m.loss == "cross_entropy") {
    std::printf("eval samples %zu accuracy %.6f\n", count, static_cast<double>(correct) / count);
  } else {
    std::printf("eval values %zu mse %.7g\n", count, sq / count);
  }
  return 0;
}

int Info(const std::string& dir) {
  Manifest m = pock::LoadManifest(dir);
  std::printf("bundle %s\ntarget %s (%s, %s, %s)\nlibrary %s\nstate %s\n", dir.c_str(),
              m.target_name.c_str(), m.arch.c_str(), m.os.c_str(), m.device.c_str(), m.library.c_str(),
              m.state_file.c_str());
  for (const Spec& s : m.inputs) std::printf("input %s %s x%zu bytes\n", s.name.c_str(), s.dtype.c_str(), s.nbytes);
  size_t trainable = 0;
  for (const Entry& e : m.tensors) trainable += e.trainable;
  std::printf("tensors %zu (trainable %zu)\n", m.tensors.size(), trainable);
  return 0;
}

int Usage() {
  std::fprintf(stderr,
               "usage: pock_runner info BUNDLE\n"
               "       pock_runner train BUNDLE DATA [--steps N] [--lr LR] [--no-save]\n"
               "       pock_runner eval BUNDLE DATA\n"
               "       pock_runner serve [--port 9090] [--dir WORKDIR]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "serve") {
    int port = 9090;
    std::string workdir = ".";
    for (int i = 2; i + 1 < argc; i += 2) {
      std::string a = argv[i];
      if (a == "--port") port = std::atoi(argv[i + 1]);
      else if (a == "--dir") workdir = argv[i + 1];
      else return Usage();
    }
    try {
      return pock::Serve(port, workdir);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "pock_runner: error: %s\n", e.what());
      return 1;
    }
  }
  if (argc < 3) return Usage();
  std::string cmd = argv[1], dir = argv[2];
  try {
    if (cmd == "info") return Info(dir);
    if (argc < 4) return Usage();
    if (cmd == "eval") return Eval(dir, argv[3]);
    if (cmd != "train") return Usage();
    int steps = 0;
    double lr = 0;
    bool save = true;
    for (int i = 4; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--steps" && i + 1 < argc) {
        steps = std::atoi(argv[++i]);
      } else if (a == "--lr" && i + 1 < argc) {
        lr = std::atof(argv[++i]);
      } else if (a == "--no-save") {
        save = false;
      } else {
        std::fprintf(stderr, "pock_runner: unknown option '%s'\n", a.c_str());
        return Usage();
      }
    }
    return Train(dir, argv[3], steps, lr, save);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pock_runner: error: %s\n", e.what());
    return 1;
  }
}
