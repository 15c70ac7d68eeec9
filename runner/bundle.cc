#include "bundle.h"

#include <cmath>
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

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

long Manifest::Find(const std::string& name) const {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].name == name) return static_cast<long>(i);
  }
  return -1;
}

namespace {

// A field that is missing or of the wrong type: the bundle was damaged or edited by hand.
[[noreturn]] void Bad(const std::string& what) {
  throw Error("manifest.json: " + what + "; the bundle is damaged or was edited by hand, write it again "
              "with `pock-tvm compile -o` or Program.save");
}

ffi::Any Get(const json::Object& o, const std::string& key, const std::string& where) {
  auto it = o.find(ffi::String(key));
  if (it == o.end()) Bad("'" + where + key + "' is missing");
  return (*it).second;
}

json::Object Obj(const ffi::Any& v, const std::string& where) {
  auto o = v.try_cast<json::Object>();
  if (!o) Bad("'" + where + "' must be an object");
  return *o;
}

json::Object ObjAt(const json::Object& o, const std::string& key, const std::string& where = "") {
  return Obj(Get(o, key, where), where + key);
}

json::Array ArrAt(const json::Object& o, const std::string& key, const std::string& where = "") {
  auto a = Get(o, key, where).try_cast<json::Array>();
  if (!a) Bad("'" + where + key + "' must be a list");
  return *a;
}

std::string AsStr(const ffi::Any& v, const std::string& where) {
  auto s = v.try_cast<ffi::String>();
  if (!s || v.type_index() == ffi::TypeIndex::kTVMFFINone) Bad("'" + where + "' must be a string");
  return std::string(*s);
}

std::string StrAt(const json::Object& o, const std::string& key, const std::string& where = "") {
  return AsStr(Get(o, key, where), where + key);
}

int64_t AsInt(const ffi::Any& v, const std::string& where) {
  if (v.type_index() != ffi::TypeIndex::kTVMFFIInt) Bad("'" + where + "' must be an integer");
  return v.cast<int64_t>();
}

bool BoolAt(const json::Object& o, const std::string& key, const std::string& where) {
  ffi::Any v = Get(o, key, where);
  if (v.type_index() != ffi::TypeIndex::kTVMFFIBool) Bad("'" + where + key + "' must be true or false");
  return v.cast<bool>();
}

// A file named by the manifest: a plain name inside the bundle, never a path out of it.
std::string PlainName(const std::string& name, const std::string& where) {
  if (name.empty() || name[0] == '.' || name.find('/') != std::string::npos ||
      name.find('\\') != std::string::npos || name.find('\0') != std::string::npos) {
    Bad("'" + where + "' must be a plain file name inside the bundle, got '" + name + "'");
  }
  return name;
}

Spec ParseSpec(const ffi::Any& v, const std::string& where) {
  json::Object o = Obj(v, where);
  Spec s;
  s.name = StrAt(o, "name", where + ".");
  s.dtype = StrAt(o, "dtype", where + ".");
  const char* dtypes[] = {"float32", "float64", "float16", "int64", "int32", "int8", "uint8"};
  bool known = false;
  for (const char* d : dtypes) known = known || s.dtype == d;
  if (!known) Bad("'" + where + ".dtype' is '" + s.dtype + "', not one of float32/float64/float16/int64/int32/int8/uint8");
  json::Array shape = ArrAt(o, "shape", where + ".");
  if (shape.size() > 8) Bad("'" + where + ".shape' has more than 8 dimensions");
  size_t n = DTypeBytes(s.dtype);
  for (size_t i = 0; i < shape.size(); ++i) {
    int64_t d = AsInt(shape[i], where + ".shape[" + std::to_string(i) + "]");
    if (d < 0 || d > (int64_t{1} << 40)) Bad("'" + where + ".shape' has a dimension out of range: " + std::to_string(d));
    s.shape.push_back(d);
    if (__builtin_mul_overflow(n, static_cast<size_t>(d), &n)) Bad("'" + where + ".shape' is too large");
  }
  s.nbytes = n;
  if (o.count(ffi::String("bound"))) {
    s.bound = AsInt(Get(o, "bound", where + "."), where + ".bound");
    if (s.bound <= 0 || (s.dtype != "int64" && s.dtype != "int32")) Bad("'" + where + ".bound' must be a positive integer on an int64/int32 input");
  }
  return s;
}

Signature ParseSignature(const json::Object& calling, const std::string& func) {
  json::Object o = ObjAt(calling, func, "calling.");
  Signature sig;
  for (const char* part : {"args", "outputs"}) {
    std::string where = "calling." + func + "." + part;
    json::Array names = ArrAt(o, part, "calling." + func + ".");
    for (size_t i = 0; i < names.size(); ++i) {
      (std::string(part) == "args" ? sig.args : sig.outputs)
          .push_back(AsStr(names[i], where + "[" + std::to_string(i) + "]"));
    }
  }
  return sig;
}

void CheckFiles(const Manifest& m, const json::Object& files) {
  for (const auto& kv : files) {
    std::string name = AsStr(kv.first, "files key");
    PlainName(name, "files[" + name + "]");
    std::string want = AsStr(kv.second, "files[" + name + "]");
    std::string path = m.dir + "/" + name;
    struct stat st{};
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || access(path.c_str(), R_OK) != 0) {
      throw Error("bundle '" + m.dir + "' is missing " + name + ", named in manifest.json; copy the "
                  "whole bundle directory");
    }
    if (Sha256File(path) != want) {
      throw Error("bundle '" + m.dir + "': " + name + " does not match its SHA-256 in manifest.json; "
                  "the file was changed or truncated, copy the bundle again");
    }
  }
}

// An ELF library whose sections or segments reach past the end of the file (a truncated copy whose
// hash was recomputed) would fault (SIGBUS) when the loader maps it; refuse it instead.
void CheckLibraryComplete(const std::string& path) {
  std::string bytes = ReadFile(path);
  auto bad = [&](const std::string& why) {
    throw Error("library '" + path + "' is damaged (" + why + "); copy the bundle again or recompile");
  };
  if (bytes.size() < 4 || bytes.compare(0, 4, "\x7f" "ELF") != 0) return;  // Mach-O, tar: left to the loader
  if (bytes.size() < 64 || bytes[4] != 2) bad("not a complete 64-bit ELF header");
  auto u16 = [&](size_t at) { uint16_t v; std::memcpy(&v, bytes.data() + at, 2); return static_cast<uint64_t>(v); };
  auto u64 = [&](size_t at) { uint64_t v; std::memcpy(&v, bytes.data() + at, 8); return v; };
  uint64_t size = bytes.size(), phoff = u64(32), shoff = u64(40);
  uint64_t phentsize = u16(54), phnum = u16(56), shentsize = u16(58), shnum = u16(60);
  if (phoff > size || phnum * phentsize > size - phoff || shoff > size || shnum * shentsize > size - shoff) {
    bad("its headers lie past the end of the file");
  }
  for (uint64_t i = 0; i < phnum; ++i) {
    uint64_t at = phoff + i * phentsize;
    if (phentsize < 56) bad("program headers too small");
    uint64_t offset = u64(at + 8), filesz = u64(at + 32);
    if (offset > size || filesz > size - offset) bad("a segment lies past the end of the file");
  }
  for (uint64_t i = 0; i < shnum; ++i) {
    uint64_t at = shoff + i * shentsize;
    if (shentsize < 64) bad("section headers too small");
    uint32_t type;
    std::memcpy(&type, bytes.data() + at + 4, 4);
    uint64_t offset = u64(at + 24), sz = u64(at + 32);
    if (type != 8 /* SHT_NOBITS */ && (offset > size || sz > size - offset)) bad("a section lies past the end of the file");
  }
}

// The calling convention only names things the runner has: inputs, the target, the learning
// rate and passed tensors; outputs are the loss and passed tensors.
void CheckSignatures(const Manifest& m) {
  std::set<std::string> have{kLR};
  for (const Spec& s : m.inputs) have.insert(s.name);
  have.insert(m.target.name);
  for (const Entry& e : m.tensors) {
    if (e.passed) have.insert(e.name);
  }
  for (const std::string& a : m.train_step.args) {
    if (!have.count(a)) Bad("'calling.train_step.args' names '" + a + "', which is no input, target or passed tensor");
  }
  for (const std::string& a : m.forward.args) {
    if (!have.count(a) || a == kLR || a == m.target.name) Bad("'calling.forward.args' names '" + a + "'");
  }
  bool loss = false;
  for (const std::string& o : m.train_step.outputs) {
    if (o == kLoss) {
      loss = true;
      continue;
    }
    long i = m.Find(o);
    if (i < 0 || !m.tensors[i].passed) Bad("'calling.train_step.outputs' names '" + o + "', which is no passed tensor");
  }
  if (!loss) Bad("'calling.train_step.outputs' has no '" + std::string(kLoss) + "'");
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
  // JSON nests objects and arrays recursively: a manifest of thousands of brackets would overflow
  // the parser's stack. A real one nests 6 deep.
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > 64) throw Error("manifest.json nests deeper than 64 levels; it is not a bundle manifest");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  ffi::String err;
  ffi::Any parsed = json::Parse(text, &err);
  if (!err.empty()) throw Error("manifest.json is not valid JSON: " + std::string(err));
  m.raw = Obj(parsed, "manifest");
  std::string format = StrAt(m.raw, "format");
  if (format != "pock_tvm.bundle/1") {
    throw Error("manifest.json has format '" + format + "', this runner reads pock_tvm.bundle/1; rebuild the "
                "runner or recompile");
  }
  json::Object files = ObjAt(m.raw, "files");
  m.library = PlainName(StrAt(m.raw, "library"), "library");
  m.state_file = PlainName(StrAt(m.raw, "state_file"), "state_file");
  for (const std::string* name : {&m.library, &m.state_file}) {
    if (!files.count(ffi::String(*name))) Bad("'" + *name + "' is not listed in 'files', so it cannot be verified");
  }
  json::Object target = ObjAt(m.raw, "target");
  m.target_name = StrAt(target, "name", "target.");
  m.arch = StrAt(target, "arch", "target.");
  m.os = StrAt(target, "os", "target.");
  m.device = StrAt(target, "device", "target.");
  if (m.arch != RunnerArch() || m.os != RunnerOS()) {
    throw Error("bundle is built for " + m.target_name + " (" + m.arch + ", " + m.os +
                "); this runner is built for " + RunnerArch() + ", " + RunnerOS() +
                ": use the runner from `pock-tvm build-runner --target " + m.target_name + "`");
  }
  CheckFiles(m, files);
  CheckLibraryComplete(dir + "/" + m.library);
  struct stat st{};
  if (stat((dir + "/" + m.state_file).c_str(), &st) != 0) throw Error("cannot read " + m.state_file);
  m.state_bytes = static_cast<size_t>(st.st_size);

  json::Object layout = ObjAt(m.raw, "layout");
  json::Array inputs = ArrAt(layout, "inputs", "layout.");
  for (size_t i = 0; i < inputs.size(); ++i) m.inputs.push_back(ParseSpec(inputs[i], "layout.inputs[" + std::to_string(i) + "]"));
  m.target = ParseSpec(Get(layout, "target", "layout."), "layout.target");
  m.output = ParseSpec(Get(layout, "output", "layout."), "layout.output");
  m.loss = StrAt(layout, "loss", "layout.");
  json::Object opt = ObjAt(layout, "optimizer", "layout.");
  if (opt.count(ffi::String("lr"))) {
    auto lr = opt[ffi::String("lr")].try_cast<double>();
    if (!lr || !std::isfinite(*lr) || *lr < 0 || *lr > 3.0e38) {
      Bad("'layout.optimizer.lr' must be a finite number >= 0");
    }
    m.lr = *lr;
  }
  // The label checks (and the evaluation) read the target as the loss defines it: the manifest's
  // loss, target and output must agree (the library itself checks every label it indexes with).
  const Spec& t = m.target;
  std::vector<int64_t> want_shape;
  std::string want_dtype;
  if (m.loss == "cross_entropy" && m.output.shape.size() == 2) {
    want_shape = {m.output.shape[0]};
    want_dtype = "int64";
  } else if (m.loss == "next_token" && m.output.shape.size() == 3) {
    want_shape = {m.output.shape[0], m.output.shape[1]};
    want_dtype = "int64";
  } else if (m.loss == "mse") {
    want_shape = m.output.shape;
    want_dtype = m.output.dtype;
  }
  if (!want_dtype.empty() && (t.shape != want_shape || t.dtype != want_dtype)) {
    Bad("'layout.target' (" + t.dtype + ") does not fit the loss '" + m.loss + "' of an output of " +
        std::to_string(m.output.shape.size()) + " dimensions");
  }
  json::Array tensors = ArrAt(m.raw, "tensors");
  std::set<std::string> names;
  int steps = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    std::string at = "tensors[" + std::to_string(i) + "]";
    json::Object o = Obj(tensors[i], at);
    Entry e;
    static_cast<Spec&>(e) = ParseSpec(tensors[i], at);
    if (!names.insert(e.name).second) Bad("'" + at + ".name' (" + e.name + ") is used twice");
    e.role = StrAt(o, "role", at + ".");
    if (e.role != "param" && e.role != "step" && e.role != "state") Bad("'" + at + ".role' must be param, step or state");
    int64_t offset = AsInt(Get(o, "offset", at + "."), at + ".offset");
    int64_t nbytes = AsInt(Get(o, "nbytes", at + "."), at + ".nbytes");
    if (offset < 0 || nbytes < 0 || static_cast<size_t>(nbytes) != e.nbytes) {
      Bad("'" + at + ".offset' must be >= 0 and '" + at + ".nbytes' equal " + std::to_string(e.nbytes) +
          " (its shape and dtype)");
    }
    e.offset = static_cast<size_t>(offset);
    if (e.offset > m.state_bytes || e.nbytes > m.state_bytes - e.offset) {
      throw Error("manifest.json: '" + at + "' (" + e.name + ") lies past the end of " + m.state_file +
                  " (" + std::to_string(m.state_bytes) + " bytes); the bundle is damaged, copy it again");
    }
    e.passed = BoolAt(o, "passed", at + ".");
    e.trainable = o.count(ffi::String("trainable")) && BoolAt(o, "trainable", at + ".");
    if (o.count(ffi::String("source"))) e.source = StrAt(o, "source", at + ".");
    if (e.role == "step") {
      ++steps;
      if (!e.shape.empty() || e.dtype != "float32") Bad("'" + at + "' (step) must be a float32 scalar");
    }
    m.tensors.push_back(e);
  }
  if (steps != 1) Bad("'tensors' must hold exactly one tensor with role 'step'");
  json::Object calling = ObjAt(m.raw, "calling");
  m.train_step = ParseSignature(calling, "train_step");
  m.forward = ParseSignature(calling, "forward");
  CheckSignatures(m);
  return m;
}

void CommitState(Manifest* m, const std::string& state, int64_t steps) {
  std::string name = "params." + std::to_string(steps) + ".bin";
  if (name == m->state_file) name = "params." + std::to_string(steps) + ".1.bin";
  WriteDurably(m->dir + "/" + name, state);
  json::Object files = ObjAt(m->raw, "files");
  files.erase(ffi::String(m->state_file));
  files.Set(ffi::String(name), ffi::String(Sha256File(m->dir + "/" + name)));
  m->raw.Set(ffi::String("files"), files);
  m->raw.Set(ffi::String("state_file"), ffi::String(name));
  WriteDurably(m->dir + "/manifest.json", std::string(json::Stringify(m->raw, 1)));
  std::remove((m->dir + "/" + m->state_file).c_str());  // a plain name inside the bundle (checked)
  m->state_file = name;
}

BundleLock::BundleLock(const std::string& dir) {
  std::string path = dir + "/.lock";
  fd_ = open(path.c_str(), O_RDWR | O_CREAT, 0644);
  if (fd_ < 0) throw Error("cannot open '" + path + "' to lock the bundle: " + std::strerror(errno));
  if (flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    close(fd_);
    fd_ = -1;
    throw Error("bundle '" + dir + "' is in use by another process (a runner or pock-tvm training it); "
                "wait until it finishes, or copy the bundle");
  }
}

BundleLock::~BundleLock() {
  if (fd_ >= 0) close(fd_);  // releases the lock
}

void CleanLeftovers(const Manifest& m) {
  json::Object files = m.raw.count(ffi::String("files")) ? Obj(m.raw[ffi::String("files")], "files") : json::Object();
  DIR* d = opendir(m.dir.c_str());
  if (!d) return;
  std::vector<std::string> remove;
  while (dirent* ent = readdir(d)) {
    std::string name = ent->d_name;
    bool state = name.rfind("params.", 0) == 0 &&
                 (name.size() > 8 && (name.compare(name.size() - 4, 4, ".bin") == 0 ||
                                      name.compare(name.size() - 8, 8, ".bin.tmp") == 0));
    if ((state || name == "manifest.json.tmp") && !files.count(ffi::String(name))) remove.push_back(name);
  }
  closedir(d);
  for (const std::string& name : remove) {
    std::remove((m.dir + "/" + name).c_str());
    std::printf("removed leftover %s\n", name.c_str());
  }
}

}  // namespace pock
