// The allow-list of `pock_runner serve`.
//
// TVM's RPC server answers any global function a client names (`rpc.Connect`, `runtime.SaveParamsToFile`,
// `vm.builtin.tensor_cache.load`, ...), and a session constructor named in the first packet turns the
// server into a proxy. The gate sits between the socket and `rpc.ServerLoop`: it frames the client's
// packets (u64 size, i32 code, body), reads the name in every global-function request and the
// constructor in the session request, and answers anything off the allow-list with an RPC exception
// that TVM's client raises. Other packets (calls on handles already given out, copies, uploads) stream
// through uninspected.
//
// Packet codes and argument encodings follow TVM's src/runtime/rpc/minrpc/rpc_reference.h (protocol
// 0.8.0); they are restated here because the runtime's public headers do not ship them.
#include "rpc_gate.h"

#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <sys/socket.h>
#include <sys/time.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <set>

namespace pock {
namespace {

namespace ffi = tvm::ffi;

constexpr int32_t kInitServer = 2;
constexpr int32_t kException = 5;
constexpr int32_t kGetGlobalFunc = 9;
constexpr int32_t kTypeRawStr = 8;     // kTVMFFIRawStr: u64 length, bytes
constexpr int32_t kTypeSmallStr = 11;  // kTVMFFISmallStr, sent like kTVMFFIStr
constexpr int32_t kTypeStr = 65;       // kTVMFFIStr: u32 type again, u64 length, bytes
constexpr uint64_t kMaxInspected = 1 << 20;

// Optional server functions a client probes for and does without: answered "not here", not an error.
constexpr const char* kProbedPrefix = "tvm.rpc.server.";
constexpr const char* kNotServed = "pock_runner.not_served";

const std::set<std::string>& AllowList() {
  static const std::set<std::string> names = {
      "tvm.rpc.server.upload",            // into --dir (tvm.rpc.server.workpath)
      "tvm.rpc.server.download",          // from --dir
      "tvm.rpc.server.remove",            // inside --dir
      "tvm.rpc.server.load_module",       // trusted libraries only (--trust / --allow-remote-code)
      "tvm.rpc.server.ModuleGetFunction", // a loaded module's functions: the VM, the kernels
      "runtime.RPCTimeEvaluator",         // timing a loaded module's function (checked in serve.cc)
      "tvm.contrib.random.random_fill",   // MetaSchedule fills its measurement inputs
      "tvm.contrib.random.random_fill_for_measure",
  };
  return names;
}

// Reads a string argument (RawStr, Str or SmallStr encoding) from `body` at `at`.
bool ReadName(const std::string& body, size_t at, std::string* out) {
  auto take = [&](void* dst, size_t n) {
    if (at + n > body.size()) return false;
    std::memcpy(dst, body.data() + at, n);
    at += n;
    return true;
  };
  int32_t num_args = 0, type = 0;
  if (!take(&num_args, 4) || num_args != 1 || !take(&type, 4)) return false;
  if (type == kTypeStr || type == kTypeSmallStr) {
    uint32_t again = 0;
    if (!take(&again, 4) || again != static_cast<uint32_t>(kTypeStr)) return false;
  } else if (type != kTypeRawStr) {
    return false;
  }
  uint64_t len = 0;
  if (!take(&len, 8) || len > body.size() - at) return false;
  out->assign(body.data() + at, len);
  return at + len == body.size();
}

template <typename T>
void Append(std::string* out, T value) {
  out->append(reinterpret_cast<const char*>(&value), sizeof(value));
}

}  // namespace

bool SendAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool AllowedRemoteFunction(const std::string& name) { return AllowList().count(name) > 0; }

bool RpcGate::ReadExact(void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = recv(fd_, p, n, 0);
    if (r <= 0) return false;  // closed, or silent past --idle-timeout (SO_RCVTIMEO)
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool RpcGate::Refuse(const std::string& why) {
  std::printf("refused: %s\n", why.c_str());
  std::fflush(stdout);
  std::string msg = "pock_runner serve: " + why;
  std::string packet;
  uint64_t nbytes = 4 + 4 + 4 + 8 + msg.size();
  Append(&packet, nbytes);
  Append(&packet, kException);
  Append<int32_t>(&packet, 1);
  Append(&packet, kTypeRawStr);
  Append<uint64_t>(&packet, msg.size());
  packet += msg;
  return SendAll(fd_, packet.data(), packet.size());
}

bool RpcGate::NextPacket() {
  uint64_t nbytes = 0;
  if (!ReadExact(&nbytes, 8)) return false;
  ready_.assign(reinterpret_cast<const char*>(&nbytes), 8);
  ready_at_ = 0;
  if (nbytes < 4) {  // TVM itself answers a malformed packet
    passthrough_ = nbytes;
    return true;
  }
  int32_t code = 0;
  if (!ReadExact(&code, 4)) return false;
  Append(&ready_, code);
  if (code != kInitServer && code != kGetGlobalFunc) {
    passthrough_ = nbytes - 4;
    return true;
  }
  if (nbytes > kMaxInspected) {
    TVM_FFI_THROW(ValueError) << "pock_runner serve: a request of " << nbytes << " bytes is not a function name";
  }
  std::string body(nbytes - 4, '\0');
  if (!ReadExact(body.data(), body.size())) return false;
  if (code == kInitServer) {
    // u64 protocol-version length, the version, then the constructor and its arguments: none allowed.
    uint64_t len = 0;
    int32_t num_args = -1;
    if (body.size() >= 8) std::memcpy(&len, body.data(), 8);
    if (body.size() >= 12 && len <= body.size() - 12) std::memcpy(&num_args, body.data() + 8 + len, 4);
    if (num_args != 0) {
      ready_.clear();
      return Refuse("a session constructor (an RPC proxy or a custom session) is not allowed; connect "
                    "with rpc.connect(host, port) and no session_constructor_args");
    }
    ready_ += body;
    return true;
  }
  std::string name;
  if (!ReadName(body, 0, &name)) {
    ready_.clear();
    return Refuse("a global-function request without a plain name");
  }
  if (AllowedRemoteFunction(name)) {
    ready_ += body;
    return true;
  }
  if (name.rfind(kProbedPrefix, 0) != 0) {
    ready_.clear();
    return Refuse("remote function '" + name + "' is not on the allow-list (files inside --dir, load_module, "
                  "a loaded module's functions, time_evaluator, random fill); see README, Security and data safety");
  }
  std::string rewritten;
  Append<int32_t>(&rewritten, 1);
  Append(&rewritten, kTypeRawStr);
  Append<uint64_t>(&rewritten, std::strlen(kNotServed));
  rewritten += kNotServed;
  nbytes = 4 + rewritten.size();
  ready_.assign(reinterpret_cast<const char*>(&nbytes), 8);
  Append(&ready_, code);
  ready_ += rewritten;
  return true;
}

std::string RpcGate::Receive(int64_t size) {
  while (true) {
    if (ready_at_ < ready_.size()) {
      size_t n = std::min(static_cast<size_t>(std::max<int64_t>(size, 0)), ready_.size() - ready_at_);
      std::string out = ready_.substr(ready_at_, n);
      ready_at_ += n;
      return out;
    }
    if (passthrough_ > 0) {
      std::string out(static_cast<size_t>(std::min<uint64_t>({static_cast<uint64_t>(std::max<int64_t>(size, 0)),
                                                               passthrough_, uint64_t{1} << 20})),
                      '\0');
      ssize_t r = recv(fd_, out.data(), out.size(), 0);
      if (r <= 0) return std::string();
      passthrough_ -= static_cast<uint64_t>(r);
      out.resize(static_cast<size_t>(r));
      return out;
    }
    ready_.clear();
    ready_at_ = 0;
    if (!NextPacket()) return std::string();
  }
}

void RpcGate::Serve() {
  timeval tv{idle_timeout_s_, 0};
  setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ffi::Function frecv = ffi::Function::FromTyped([this](int64_t size) { return ffi::Bytes(Receive(size)); });
  ffi::Function fsend = ffi::Function::FromPacked([this](ffi::PackedArgs args, ffi::Any* rv) {
    ffi::Bytes bytes = args[0].cast<ffi::Bytes>();
    *rv = SendAll(fd_, bytes.data(), bytes.size()) ? static_cast<int64_t>(bytes.size()) : int64_t{-1};
  });
  ffi::Function::GetGlobalRequired("rpc.ServerLoop")(fsend, frecv);
}

}  // namespace pock
