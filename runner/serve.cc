// `pock_runner serve`: a TVM RPC server with no Python, so the host can upload a bundle's library
// and run and time its step on the device (`pock-tvm run BUNDLE --rpc HOST:PORT`). It speaks the
// handshake of TVM's tvm/rpc/server.py, then hands the socket to the runtime's rpc.ServerLoop,
// so TVM's own client works with it.
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "bundle.h"

namespace ffi = tvm::ffi;

namespace {

constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kCodeSuccess = kRPCMagic + 0;
constexpr int32_t kCodeMismatch = kRPCMagic + 2;

bool RecvAll(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = recv(fd, p, n, 0);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool SendAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t r = send(fd, p, n, 0);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// The client sends the magic, then "client:<key> [options]"; we answer success and our key.
bool Handshake(int fd) {
  int32_t magic = 0, len = 0;
  if (!RecvAll(fd, &magic, 4) || magic != kRPCMagic || !RecvAll(fd, &len, 4) || len < 0 || len > 4096) {
    return false;
  }
  std::string key(static_cast<size_t>(len), '\0');
  if (!RecvAll(fd, key.data(), key.size())) return false;
  if (key.rfind("client:", 0) != 0) {
    SendAll(fd, &kCodeMismatch, 4);
    return false;
  }
  std::string server_key = "server:pock_runner";
  int32_t n = static_cast<int32_t>(server_key.size());
  return SendAll(fd, &kCodeSuccess, 4) && SendAll(fd, &n, 4) && SendAll(fd, server_key.data(), server_key.size());
}

}  // namespace

namespace pock {

int Serve(int port, const std::string& workdir) {
  dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL);  // CUDA devices where the library ships
  ffi::Function::SetGlobal("tvm.rpc.server.workpath", ffi::Function::FromTyped([workdir](std::string path) {
                             return workdir + "/" + path;
                           }), true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module", ffi::Function::FromTyped([workdir](std::string file) {
                             return ffi::Module::LoadFromFile(workdir + "/" + file);
                           }), true);
  ffi::Function server_loop = ffi::Function::GetGlobalRequired("rpc.ServerLoop");
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(listener, 1) != 0) {
    throw Error("cannot listen on port " + std::to_string(port) + " (in use?); pick another with --port");
  }
  std::printf("serving TVM RPC on port %d, files in %s\n", port, workdir.c_str());
  std::fflush(stdout);
  while (true) {
    int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) continue;
    if (Handshake(fd)) {
      std::printf("session started\n");
      std::fflush(stdout);
      server_loop(fd);
      std::printf("session ended\n");
      std::fflush(stdout);
    }
    close(fd);
  }
}

}  // namespace pock
