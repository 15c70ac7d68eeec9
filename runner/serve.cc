// `pock_runner serve`: a TVM RPC server with no Python, so the host can upload a bundle's library
// and run and time its step on the device (`pock-tvm run BUNDLE --rpc HOST:PORT`). It speaks the
// handshake of TVM's tvm/rpc/server.py, then hands the socket to the runtime's rpc.ServerLoop,
// so TVM's own client works with it.
//
// What a client can do, and the limits:
// - It binds 127.0.0.1 unless --host says otherwise: anyone who reaches the port is a client, there
//   is no authentication (as with TVM's own server). Open it only on a network you trust.
// - Files: upload, download and remove stay inside --dir (absolute paths and `..` are refused);
//   removing "" (a client cleaning up its session) leaves --dir itself in place.
// - Code: loading a library runs its code. Only libraries whose SHA-256 a --trust BUNDLE names are
//   loaded, unless --allow-remote-code (needed for autotuning, where every candidate is new code);
//   the runtime's other module loaders are refused the same way.
// - One client at a time, each in its own process: a client that stays silent in the handshake is
//   dropped after --handshake-timeout seconds, an idle session after --idle-timeout, then the next
//   waiting client is served.
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "bundle.h"
#include "serve.h"
#include "sha256.h"

namespace ffi = tvm::ffi;


namespace {

constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kCodeSuccess = kRPCMagic + 0;
constexpr int32_t kCodeMismatch = kRPCMagic + 2;

// Globals through which a client could load a native library without asking load_module.
const char* kModuleLoaders[] = {"ffi.ModuleLoadFromFile", "ffi.Module.load_from_file.so",
                                "ffi.Module.load_from_file.dylib", "runtime.ModuleLoadStaticLibrary"};

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
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void SetRecvTimeout(int fd, int seconds) {
  timeval tv{seconds, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
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

// A client's file name, resolved inside the work directory; anything that could leave it is refused.
std::string InsideWorkdir(const std::string& workdir, const std::string& path) {
  bool escapes = !path.empty() && path[0] == '/';
  size_t start = 0;
  while (!escapes && start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    escapes = path.compare(start, end - start, "..") == 0 && end - start == 2;
    start = end + 1;
  }
  if (escapes || path.find('\0') != std::string::npos) {
    TVM_FFI_THROW(ValueError) << "pock_runner serve: refused path '" << path
                              << "': files stay inside the server's --dir (no absolute paths, no '..')";
  }
  return path.empty() ? workdir : workdir + "/" + path;
}

void Register(const pock::ServeOptions& o) {
  std::set<std::string> trusted;
  for (const std::string& bundle : o.trusted_bundles) {
    pock::Manifest m = pock::LoadManifest(bundle);  // checks the bundle's hashes
    trusted.insert(std::string(m.raw[tvm::ffi::String("files")].cast<tvm::ffi::json::Object>()[tvm::ffi::String(m.library)]
                                   .cast<tvm::ffi::String>()));
    std::fprintf(stderr, "trusting %s/%s\n", bundle.c_str(), m.library.c_str());
  }
  ffi::Function load_so = ffi::Function::GetGlobalRequired("ffi.Module.load_from_file.so");
  std::string workdir = o.workdir;
  ffi::Function::SetGlobal("tvm.rpc.server.workpath", ffi::Function::FromTyped([workdir](std::string path) {
                             return InsideWorkdir(workdir, path);
                           }), true);
  // TVM's own server removes "" (its per-session temporary directory) after a client's cleanup;
  // here "" is --dir itself, which belongs to whoever started the server: it stays.
  ffi::Function::SetGlobal("tvm.rpc.server.remove", ffi::Function::FromTyped([workdir](std::string file) {
                             std::string path = InsideWorkdir(workdir, file);
                             if (path != workdir) std::remove(path.c_str());  // a missing file is no error
                           }), true);
  bool allow = o.allow_remote_code;
  ffi::Function::SetGlobal(
      "tvm.rpc.server.load_module", ffi::Function::FromTyped([workdir, trusted, allow, load_so](std::string file) {
        std::string path = InsideWorkdir(workdir, file);
        if (!allow && !trusted.count(pock::Sha256File(path))) {
          TVM_FFI_THROW(PermissionError)
              << "pock_runner serve: refused to load '" << file << "': loading a library runs its code, and its "
              << "SHA-256 is not that of a bundle the server trusts; start the server with --trust BUNDLE "
              << "(the bundle being run) or, to run any client's code (autotuning), --allow-remote-code";
        }
        return load_so(path, std::string("so")).cast<ffi::Module>();
      }), true);
  if (!allow) {
    for (const char* name : kModuleLoaders) {
      if (!ffi::Function::GetGlobal(name)) continue;
      std::string shown = name;
      ffi::Function::SetGlobal(name, ffi::Function::FromPacked([shown](ffi::PackedArgs, ffi::Any*) {
                                 TVM_FFI_THROW(PermissionError)
                                     << "pock_runner serve: '" << shown << "' is disabled; load libraries through "
                                     << "load_module (see --trust and --allow-remote-code)";
                               }), true);
    }
  }
}

}  // namespace

namespace pock {

int Serve(const ServeOptions& o) {
  dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL);  // CUDA devices where the library ships
  Register(o);
  ffi::Function server_loop = ffi::Function::GetGlobalRequired("rpc.ServerLoop");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(o.port));
  if (inet_pton(AF_INET, o.host.c_str(), &addr.sin_addr) != 1) {
    throw Error("--host takes an IPv4 address (127.0.0.1, the default, or 0.0.0.0 for every interface), got '" +
                o.host + "'");
  }
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(listener, 8) != 0) {
    throw Error("cannot listen on " + o.host + ":" + std::to_string(o.port) + " (in use?); pick another with --port");
  }
  if (o.host.rfind("127.", 0) != 0) {
    std::printf("warning: serving on %s: anyone who can reach port %d can upload files into %s%s\n", o.host.c_str(),
                o.port, o.workdir.c_str(), o.allow_remote_code ? " and run any code on this machine" : "");
  }
  std::printf("serving TVM RPC on %s:%d, files in %s%s\n", o.host.c_str(), o.port, o.workdir.c_str(),
              o.allow_remote_code ? ", remote code allowed" : "");
  std::fflush(stdout);
  signal(SIGPIPE, SIG_IGN);
  while (true) {
    int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) continue;
    pid_t child = fork();
    if (child == 0) {  // one process per session: a crash or a hang ends only this session
      close(listener);
      SetRecvTimeout(fd, o.handshake_timeout_s);
      if (!Handshake(fd)) {
        std::printf("handshake failed or timed out\n");
        std::fflush(stdout);
        _exit(1);
      }
      std::printf("session started\n");
      std::fflush(stdout);
      SetRecvTimeout(fd, o.idle_timeout_s);
      int code = 0;
      try {
        server_loop(fd);
      } catch (const std::exception& e) {
        std::printf("session error: %s\n", e.what());
        code = 1;
      }
      std::printf("session ended\n");
      std::fflush(stdout);
      _exit(code);
    }
    close(fd);
    if (child > 0) waitpid(child, nullptr, 0);
  }
}

}  // namespace pock
