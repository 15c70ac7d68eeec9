// pock_runner: runs a pock_tvm training bundle on the device, with the TVM runtime and no Python.
//
//   pock_runner info  BUNDLE
//   pock_runner train BUNDLE DATA [--steps N] [--lr LR] [--no-save]
//   pock_runner eval  BUNDLE DATA
//   pock_runner serve [--host 127.0.0.1] [--port 9090] [--dir WORKDIR] [--trust BUNDLE]...
//                     [--allow-remote-code] [--handshake-timeout S] [--idle-timeout S]
//                     [--max-sessions N]   (TVM RPC server, see serve.cc)
//
// DATA holds whole batches back to back: for each batch the inputs, then the target, each as
// raw little-endian C-order bytes with the shapes and dtypes of manifest.json (`pock-tvm pack-data`).
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "bundle.h"
#include "serve.h"

namespace ffi = tvm::ffi;
using pock::Entry;
using pock::Error;
using pock::Manifest;
using pock::Spec;


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
    CheckLibrarySignature("train_step", m.train_step);
    CheckLibrarySignature("forward", m.forward);
    state = pock::ReadFile(m.dir + "/" + m.state_file);
    if (state.size() != m.state_bytes) throw Error(m.state_file + " changed while it was read; try again");
    for (const Entry& e : m.tensors) {
      tensors.push_back(e.passed ? rt.Put(e, state.data() + e.offset) : ffi::Tensor());
    }
  }

  // The library's function takes exactly the arguments the manifest names, in that order.
  void CheckLibrarySignature(const char* func, const pock::Signature& sig) {
    ffi::Module vm = vm_holder.value();
    auto arity = vm->GetFunction("get_function_arity");
    auto name = vm->GetFunction("get_function_param_name");
    if (!arity || !name) return;  // an older runtime without the query; the VM still checks each call
    int64_t n = arity.value()(std::string(func)).cast<int64_t>();
    bool same = n == static_cast<int64_t>(sig.args.size());
    for (int64_t i = 0; same && i < n; ++i) {
      same = name.value()(std::string(func), i).cast<ffi::String>() == sig.args[i];
    }
    if (!same) {
      throw Error(std::string("the library's ") + func + " does not take the arguments manifest.json names "
                  "('calling'); the manifest does not belong to this library, write the bundle again");
    }
  }

  ffi::Any Call(const char* name, const std::vector<ffi::Any>& args) {
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any rv;
    vm_holder.value()->GetFunction(name).value().CallPacked(views.data(), static_cast<int32_t>(views.size()), &rv);
    return rv;
  }

  // Arguments of `sig` by name: `given` (inputs, target, lr) first, then the bundle's tensors.
  std::vector<ffi::Any> Args(const pock::Signature& sig, const std::map<std::string, ffi::Tensor>& given) const {
    std::vector<ffi::Any> args;
    for (const std::string& name : sig.args) {
      auto it = given.find(name);
      args.push_back(it != given.end() ? it->second : tensors[static_cast<size_t>(m.Find(name))]);
    }
    return args;
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
  d.batches = d.batch_bytes ? d.bytes.size() / d.batch_bytes : 0;
  if (d.batches == 0 || d.bytes.size() % d.batch_bytes != 0) {
    throw Error("data file '" + path + "' has " + std::to_string(d.bytes.size()) +
                " bytes, not a whole number of batches of " + std::to_string(d.batch_bytes) +
                " bytes (inputs then target, shapes of manifest.json); write it with `pock-tvm pack-data`");
  }
  // Token ids index an embedding table: one out of range would read outside it.
  size_t offset = 0;
  for (const Spec& spec : m.inputs) {
    if (spec.bound >= 0) {
      size_t width = spec.dtype == "int64" ? 8 : 4, count = spec.nbytes / width;
      for (size_t b = 0; b < d.batches; ++b) {
        const char* p = d.bytes.data() + b * d.batch_bytes + offset;
        for (size_t i = 0; i < count; ++i) {
          int64_t id = 0;
          if (width == 8) std::memcpy(&id, p + i * 8, 8);
          else { int32_t v; std::memcpy(&v, p + i * 4, 4); id = v; }
          if (id < 0 || id >= spec.bound) {
            throw Error("data file '" + path + "': input '" + spec.name + "' holds " + std::to_string(id) + " (batch " +
                        std::to_string(b) + ", position " + std::to_string(i) + "), outside [0, " +
                        std::to_string(spec.bound) + ") of the table it indexes (a vocabulary); fix the ids and pack "
                        "the data again");
          }
        }
      }
    }
    offset += spec.nbytes;
  }
  // NaN or inf in a float input or target turns every parameter it reaches into NaN.
  offset = 0;
  for (const Spec* spec : [&] { std::vector<const Spec*> v; for (const Spec& x : m.inputs) v.push_back(&x);
                                v.push_back(&m.target); return v; }()) {
    if (spec->dtype == "float32") {
      size_t count = spec->nbytes / sizeof(float);
      for (size_t b = 0; b < d.batches; ++b) {
        const char* p = d.bytes.data() + b * d.batch_bytes + offset;
        for (size_t i = 0; i < count; ++i) {
          float v;
          std::memcpy(&v, p + i * sizeof(float), sizeof(float));
          if (!std::isfinite(v)) {
            throw Error("data file '" + path + "': '" + spec->name + "' holds " + (std::isnan(v) ? "NaN" : "inf") +
                        " (batch " + std::to_string(b) + ", position " + std::to_string(i) +
                        "); inputs and targets must be finite: clean the data and pack it again");
          }
        }
      }
    }
    offset += spec->nbytes;
  }
  // Class labels index the logits: one out of range would read outside them. A causal LM's
  // next-token labels may also be -100 (a position that does not count: padding).
  bool next_token = m.loss == "next_token" && m.output.shape.size() == 3;
  if ((next_token || (m.loss == "cross_entropy" && m.output.shape.size() == 2)) && m.target.dtype == "int64") {
    int64_t classes = m.output.shape.back();
    size_t per_batch = m.target.nbytes / sizeof(int64_t);
    for (size_t b = 0; b < d.batches; ++b) {
      const char* t = d.bytes.data() + b * d.batch_bytes + (d.batch_bytes - m.target.nbytes);
      for (size_t i = 0; i < per_batch; ++i) {
        int64_t label;
        std::memcpy(&label, t + i * sizeof(int64_t), sizeof(int64_t));
        if ((label < 0 || label >= classes) && !(next_token && label == -100)) {
          throw Error("data file '" + path + "': label " + std::to_string(label) + " (batch " + std::to_string(b) +
                      ", sample " + std::to_string(i) + ") is outside [0, " + std::to_string(classes) +
                      ") for the model's classes" + std::string(next_token ? " (or -100 for a position that does not count)" : "") +
                      "; fix the labels and pack the data again");
        }
      }
    }
  }
  return d;
}

std::map<std::string, ffi::Tensor> Batch(const Session& s, const Data& d, size_t index) {
  const char* p = d.bytes.data() + (index % d.batches) * d.batch_bytes;
  std::map<std::string, ffi::Tensor> out;
  for (const Spec& spec : s.m.inputs) {
    out[spec.name] = s.rt.Put(spec, p);
    p += spec.nbytes;
  }
  out[s.m.target.name] = s.rt.Put(s.m.target, p);
  return out;
}

// The first tensor of `state` (params.bin layout) holding NaN or inf, as a message; empty if none.
std::string NonFinite(const Manifest& m, const std::string& state) {
  for (const Entry& e : m.tensors) {
    if (e.dtype != "float32") continue;
    size_t count = 0, n = e.nbytes / sizeof(float);
    for (size_t i = 0; i < n; ++i) {
      float v;
      std::memcpy(&v, state.data() + e.offset + i * sizeof(float), sizeof(float));
      count += !std::isfinite(v);
    }
    if (count) {
      return "'" + (e.source.empty() ? e.name : e.source) + "' (" + e.name + ") has " + std::to_string(count) +
             " of " + std::to_string(n) + " values NaN or inf";
    }
  }
  return "";
}

// How many of `forward`'s float32 outputs on the first batch of `d` are NaN or inf.
size_t NonFiniteOutputs(Session& s, const Data& d) {
  if (s.m.output.dtype != "float32") return 0;
  ffi::Tensor out = s.Call("forward", s.Args(s.m.forward, Batch(s, d, 0))).cast<ffi::Tensor>();
  std::string bytes = s.rt.Get(out, s.m.output.nbytes);
  size_t count = 0;
  for (size_t i = 0; i < bytes.size() / sizeof(float); ++i) {
    float v;
    std::memcpy(&v, bytes.data() + i * sizeof(float), sizeof(float));
    count += !std::isfinite(v);
  }
  return count;
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
  pock::BundleLock lock(dir);
  Session s(dir);
  if (save) pock::CleanLeftovers(s.m);
  Data d = LoadData(s.m, data_path);
  if (steps <= 0) steps = static_cast<int>(d.batches);
  if (lr < 0) lr = s.m.lr;
  float lr_value = static_cast<float>(lr);
  ffi::Tensor lr_t = s.rt.Put(Spec{pock::kLR, {}, "float32", 4}, reinterpret_cast<const char*>(&lr_value));
  double total_ms = 0;
  ResetPeak();
  long base_kib = StatusKiB("VmRSS");
  long base_anon_kib = StatusKiB("RssAnon");
  for (int i = 0; i < steps; ++i) {
    std::map<std::string, ffi::Tensor> given = Batch(s, d, static_cast<size_t>(i));
    given[pock::kLR] = lr_t;
    std::vector<ffi::Any> args = s.Args(s.m.train_step, given);
    auto start = std::chrono::steady_clock::now();
    ffi::Array<ffi::Any> out = s.Call("train_step", args).cast<ffi::Array<ffi::Any>>();
    if (out.size() != s.m.train_step.outputs.size()) throw Error("train_step returned an unexpected number of values");
    float loss = 0;
    for (size_t o = 0; o < out.size(); ++o) {
      const std::string& name = s.m.train_step.outputs[o];
      if (name == pock::kLoss) {
        loss = Scalar(s.rt, out[o].cast<ffi::Tensor>());  // waits for the step to finish
      } else {
        s.tensors[static_cast<size_t>(s.m.Find(name))] = out[o].cast<ffi::Tensor>();
      }
    }
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    total_ms += ms;
    std::printf("step %d loss %.7g time_ms %.3f\n", i + 1, loss, ms);
    if (!std::isfinite(loss)) throw Error("loss is not finite at step " + std::to_string(i + 1) +
                                          "; lower the learning rate (--lr); parameters not saved");
  }
  std::printf("steps %d mean_time_ms %.3f\n", steps, total_ms / steps);
  // train_peak_kib: what the steps allocate beyond the loaded bundle (activations, gradients, scratch);
  // the optimizer state was loaded with the bundle, so it is reported beside it
  size_t state_bytes = 0;
  for (const Entry& e : s.m.tensors) state_bytes += e.role == "state" ? e.nbytes : 0;
  // train_anon_kib: the anonymous (data) part, without the pages of the step's code and constants
  // that its first run reads in from the library file; the runtime pools what a step allocates, so
  // after the steps it is the data high-water mark
  std::printf("memory loaded_kib %ld train_peak_kib %ld optimizer_state_kib %zu train_anon_kib %ld\n", base_kib,
              StatusKiB("VmHWM") - base_kib, (state_bytes + 1023) / 1024, StatusKiB("RssAnon") - base_anon_kib);
  std::string current = s.CurrentState();
  std::string bad = NonFinite(s.m, current);
  if (!bad.empty()) {
    throw Error("training diverged: " + bad + "; nothing was saved, lower the learning rate (--lr)");
  }
  // Finite weights (1e29) can still make a model that predicts NaN or inf: what is saved must
  // give finite outputs on the first batch.
  size_t output_bad = NonFiniteOutputs(s, d);
  if (output_bad) {
    throw Error("training diverged: the trained model's output on the first batch holds " +
                std::to_string(output_bad) + " NaN or inf values; nothing was saved, lower the learning rate (--lr)");
  }
  if (save) {
    size_t step_index = 0;
    for (size_t i = 0; i < s.m.tensors.size(); ++i) step_index = s.m.tensors[i].role == "step" ? i : step_index;
    float done;
    std::memcpy(&done, current.data() + s.m.tensors[step_index].offset, sizeof(float));
    pock::CommitState(&s.m, current, static_cast<int64_t>(std::lround(done)));
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
    ffi::Tensor logits = s.Call("forward", s.Args(s.m.forward, Batch(s, d, b))).cast<ffi::Tensor>();
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
               "       pock_runner serve [--host 127.0.0.1] [--port 9090] [--dir WORKDIR] [--trust BUNDLE]...\n"
               "                         [--allow-remote-code] [--handshake-timeout S] [--idle-timeout S]\n"
               "                         [--max-sessions N]\n");
  return 2;
}

// Whole-string numbers only: "10x", "", "1e400" or a value out of range are refused.
long ParseInt(const std::string& flag, const char* text, long low, long high) {
  errno = 0;
  char* end = nullptr;
  long v = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < low || v > high) {
    throw Error(flag + " takes an integer in [" + std::to_string(low) + ", " + std::to_string(high) + "], got '" +
                text + "'");
  }
  return v;
}

double ParseLR(const char* text) {
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(text, &end);
  if (errno != 0 || end == text || *end != '\0' || !std::isfinite(v) || v < 0) {
    throw Error(std::string("--lr takes a finite number >= 0, got '") + text + "'");
  }
  return v;
}

int Main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "serve") {
    pock::ServeOptions o;
    for (int i = 2; i < argc; ++i) {
      std::string a = argv[i];
      bool has_value = i + 1 < argc;
      if (a == "--allow-remote-code") {
        o.allow_remote_code = true;
      } else if (a == "--port" && has_value) {
        o.port = static_cast<int>(ParseInt("--port", argv[++i], 0, 65535));
      } else if (a == "--host" && has_value) {
        o.host = argv[++i];
      } else if (a == "--dir" && has_value) {
        o.workdir = argv[++i];
      } else if (a == "--trust" && has_value) {
        o.trusted_bundles.push_back(argv[++i]);
      } else if (a == "--handshake-timeout" && has_value) {
        o.handshake_timeout_s = static_cast<int>(ParseInt("--handshake-timeout", argv[++i], 1, 3600));
      } else if (a == "--max-sessions" && has_value) {
        o.max_sessions = static_cast<int>(ParseInt("--max-sessions", argv[++i], 1, 256));
      } else if (a == "--idle-timeout" && has_value) {
        o.idle_timeout_s = static_cast<int>(ParseInt("--idle-timeout", argv[++i], 1, 86400));
      } else {
        std::fprintf(stderr, "pock_runner: unknown or incomplete option '%s'\n", a.c_str());
        return Usage();
      }
    }
    return pock::Serve(o);
  }
  if (argc < 3) return Usage();
  std::string cmd = argv[1], dir = argv[2];
  if (cmd == "info") return Info(dir);
  if (argc < 4) return Usage();
  if (cmd == "eval") return Eval(dir, argv[3]);
  if (cmd != "train") return Usage();
  int steps = 0;
  double lr = -1;  // the bundle's
  bool save = true;
  for (int i = 4; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) {
      steps = static_cast<int>(ParseInt("--steps", argv[++i], 1, 1L << 30));
    } else if (a == "--lr" && i + 1 < argc) {
      lr = ParseLR(argv[++i]);
    } else if (a == "--no-save") {
      save = false;
    } else {
      std::fprintf(stderr, "pock_runner: unknown or incomplete option '%s'\n", a.c_str());
      return Usage();
    }
  }
  return Train(dir, argv[3], steps, lr, save);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pock_runner: error: %s\n", e.what());
    return 1;
  }
}
