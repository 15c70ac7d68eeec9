#include "bundle.h"

#include <cstdio>
#include <fstream>
#include <sstream>

#include <unistd.h>

#include "sha256.h"

namespace pock {

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

std::string RunnerArch() {
#if defined(__aarch64__) && defined(__APPLE__)
  return "arm64";
#elif defined(__aarch64__)
  return "aarch64";
#elif defined(__x86_64__)
  return "x86_64";
#else
  return "unknown";
#endif
}

std::string RunnerOS() {
#if defined(__APPLE__)
  return "macos";
#else
  return "linux";
#endif
}

DLDataType ParseDType(const std::string& dtype) {
  if (dtype == "float32") return DLDataType{kDLFloat, 32, 1};
  if (dtype == "float64") return DLDataType{kDLFloat, 64, 1};
  if (dtype == "float16") return DLDataType{kDLFloat, 16, 1};
  if (dtype == "int64") return DLDataType{kDLInt, 64, 1};
  if (dtype == "int32") return DLDataType{kDLInt, 32, 1};
  if (dtype == "int8") return DLDataType{kDLInt, 8, 1};
  if (dtype == "uint8") return DLDataType{kDLUInt, 8, 1};
  throw Error("unsupported dtype '" + dtype + "' in manifest.json");
}

size_t DTypeBytes(const std::string& dtype) { return ParseDType(dtype).bits / 8; }

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read '" + path + "'");
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

namespace {

json::Object Obj(const ffi::Any& v, const char* what) {
  auto o = v.try_cast<json::Object>();
  if (!o) throw Error(std::string("manifest.json: '") + what + "' is not an object");
  return *o;
}

ffi::Any Get(const json::Object& o, const char* key) {
  auto it = o.find(ffi::String(key));
  if (it == o.end()) throw Error(std::string("manifest.json: missing '") + key + "'");
  return (*it).second;
}

std::string Str(const json::Object& o, const char* key) { return Get(o, key).cast<ffi::String>(); }

Spec ParseSpec(const ffi::Any& v) {
  json::Object o = Obj(v, "spec");
  Spec s;
  s.name = Str(o, "name");
  s.dtype = Str(o, "dtype");
  size_t n = 1;
  for (const ffi::Any& d : Get(o, "shape").cast<json::Array>()) {
    s.shape.push_back(d.cast<int64_t>());
    n *= static_cast<size_t>(s.shape.back());
  }
  s.nbytes = n * DTypeBytes(s.dtype);
  return s;
}

void CheckFiles(const Manifest& m) {
  for (const auto& kv : Obj(Get(m.raw, "files"), "files")) {
    std::string name = kv.first.cast<ffi::String>();
    std::string want = kv.second.cast<ffi::String>();
    std::string path = m.dir + "/" + name;
    if (access(path.c_str(), R_OK) != 0) {
      throw Error("bundle '" + m.dir + "' is missing " + name + ", named in manifest.json; copy the "
                  "whole bundle directory");
    }
    if (Sha256File(path) != want) {
      throw Error("bundle '" + m.dir + "': " + name + " does not match its SHA-256 in manifest.json; "
                  "the file was changed or truncated, copy the bundle again");
    }
  }
}

void WriteDurably(const std::string& path, const std::string& data) {
  std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error("cannot write '" + tmp + "'");
  bool ok = std::fwrite(data.data(), 1, data.size(), f) == data.size();
  ok = std::fflush(f) == 0 && ok;
  ok = fsync(fileno(f)) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("failed to write '" + path + "' (disk full?); the previous state is kept");
  }
}

}  // namespace

Manifest LoadManifest(const std::string& dir) {
  Manifest m;
  m.dir = dir;
  std::string text;
  try {
    text = ReadFile(dir + "/manifest.json");
  } catch (const Error&) {
    throw Error("'" + dir + "' has no manifest.json; pass a bundle written by `pock-tvm compile -o`");
  }
  ffi::String err;
  ffi::Any parsed = json::Parse(text, &err);
  if (!err.empty()) throw Error("manifest.json is not valid JSON: " + std::string(err));
  m.raw = Obj(parsed, "manifest");
  if (Str(m.raw, "format") != "pock_tvm.bundle/1") {
    throw Error("manifest.json has format '" + Str(m.raw, "format") +
                "', this runner reads pock_tvm.bundle/1; rebuild the runner or recompile");
  }
  m.library = Str(m.raw, "library");
  m.state_file = Str(m.raw, "state_file");
  json::Object target = Obj(Get(m.raw, "target"), "target");
  m.target_name = Str(target, "name");
  m.arch = Str(target, "arch");
  m.os = Str(target, "os");
  m.device = Str(target, "device");
  if (m.arch != RunnerArch() || m.os != RunnerOS()) {
    throw Error("bundle is built for " + m.target_name + " (" + m.arch + ", " + m.os +
                "); this runner is built for " + RunnerArch() + ", " + RunnerOS() +
                ": use the runner from `pock-tvm build-runner --target " + m.target_name + "`");
  }
  CheckFiles(m);
  json::Object layout = Obj(Get(m.raw, "layout"), "layout");
  for (const ffi::Any& s : Get(layout, "inputs").cast<json::Array>()) m.inputs.push_back(ParseSpec(s));
  m.target = ParseSpec(Get(layout, "target"));
  m.output = ParseSpec(Get(layout, "output"));
  m.loss = Str(layout, "loss");
  json::Object opt = Obj(Get(layout, "optimizer"), "optimizer");
  if (opt.count(ffi::String("lr"))) m.lr = Get(opt, "lr").cast<double>();
  for (const ffi::Any& t : Get(m.raw, "tensors").cast<json::Array>()) {
    json::Object o = Obj(t, "tensor");
    Entry e;
    static_cast<Spec&>(e) = ParseSpec(t);
    e.role = Str(o, "role");
    e.offset = static_cast<size_t>(Get(o, "offset").cast<int64_t>());
    e.passed = Get(o, "passed").cast<bool>();
    e.trainable = o.count(ffi::String("trainable")) && Get(o, "trainable").cast<bool>();
    m.tensors.push_back(e);
  }
  return m;
}

void CommitState(Manifest* m, const std::string& state, int64_t steps) {
  std::string name = "params." + std::to_string(steps) + ".bin";
  if (name == m->state_file) name = "params." + std::to_string(steps) + ".1.bin";
  WriteDurably(m->dir + "/" + name, state);
  json::Object files = Obj(Get(m->raw, "files"), "files");
  files.erase(ffi::String(m->state_file));
  files.Set(ffi::String(name), ffi::String(Sha256File(m->dir + "/" + name)));
  m->raw.Set(ffi::String("files"), files);
  m->raw.Set(ffi::String("state_file"), ffi::String(name));
  WriteDurably(m->dir + "/manifest.json", std::string(json::Stringify(m->raw, 1)));
  std::remove((m->dir + "/" + m->state_file).c_str());
  m->state_file = name;
}

}  // namespace pock
