// `pock_runner serve`: a TVM RPC server with no Python, so the host can upload a bundle's library
// and run and time its step on the device (`pock-tvm run BUNDLE --rpc HOST:PORT`). It speaks the
// handshake of TVM's tvm/rpc/server.py, then hands the socket to the runtime's rpc.ServerLoop,
// so TVM's own client works with it.
//
// What a client can do, and the limits:
// - It binds 127.0.0.1 unless --host says otherwise: anyone who reaches the port is a client, there
//   is no authentication (as with TVM's own server). Open it only on a network you trust.
// - Remote functions: only those on the allow-list in rpc_gate.cc (files, load_module, a loaded
//   module's functions, timing, random fill); every other name and every session constructor (RPC
//   proxies) is refused before TVM sees the request.
// - Files: upload, download and remove stay inside the work directory (absolute paths and `..` are
//   refused): --dir, which must exist, or a fresh private temporary directory; removing "" (a client
//   cleaning up its session) leaves it in place.
// - Code: loading a library runs its code. Only libraries whose SHA-256 a --trust BUNDLE names are
//   loaded, unless --allow-remote-code (needed for autotuning, where every candidate is new code);
//   the runtime's other module loaders are refused the same way.
// - Sessions: each in its own process, at most --max-sessions at once (others wait in the listen
//   queue); the whole handshake must finish within --handshake-timeout seconds, and a session silent
//   for --idle-timeout seconds ends.
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <arpa/inet.h>
#include <poll.h>
#include <sys/stat.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "bundle.h"
#include "rpc_gate.h"
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

using Clock = std::chrono::steady_clock;

// Reads exactly n bytes before `deadline`: a client trickling bytes cannot stretch the handshake.
bool RecvBefore(int fd, void* buf, size_t n, Clock::time_point deadline) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd pfd{fd, POLLIN, 0};
    if (left <= 0 || poll(&pfd, 1, static_cast<int>(std::min<long long>(left, INT_MAX))) <= 0) return false;
    ssize_t r = recv(fd, p, n, MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) return false;
    if (r < 0) continue;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// The client sends the magic, then "client:<key> [options]"; we answer success and our key.
bool Handshake(int fd, int timeout_s) {
  Clock::time_point deadline = Clock::now() + std::chrono::seconds(timeout_s);
  int32_t magic = 0, len = 0;
  if (!RecvBefore(fd, &magic, 4, deadline) || magic != kRPCMagic || !RecvBefore(fd, &len, 4, deadline) || len < 0 ||
      len > 4096) {
    return false;
  }
  std::string key(static_cast<size_t>(len), '\0');
  if (!RecvBefore(fd, key.data(), key.size(), deadline)) return false;
  if (key.rfind("client:", 0) != 0) {
    pock::SendAll(fd, &kCodeMismatch, 4);
    return false;
  }
  std::string server_key = "server:pock_runner";
  int32_t n = static_cast<int32_t>(server_key.size());
  return pock::SendAll(fd, &kCodeSuccess, 4) && pock::SendAll(fd, &n, 4) && pock::SendAll(fd, server_key.data(), server_key.size());
}

// --dir, which must be an existing directory, or a fresh private one; as an absolute path.
std::string WorkDir(const std::string& asked) {
  std::string dir = asked;
  if (dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/pock_runner-XXXXXX";
    if (!mkdtemp(pattern.data())) throw pock::Error("cannot create a private work directory " + pattern);
    dir = pattern;  // mode 0700
  }
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw pock::Error("--dir '" + dir + "' is not an existing directory; create it (the server keeps clients' " +
                      "files inside it) or leave --dir out for a fresh private one");
  }
  char resolved[PATH_MAX];
  if (!realpath(dir.c_str(), resolved)) throw pock::Error("cannot resolve --dir '" + dir + "'");
  return resolved;
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
  // Timing runs one function of a module the client loaded; a global function (no module) or a
  // pre-processing function by name would let a client call anything off the allow-list.
  ffi::Function time_evaluator = ffi::Function::GetGlobalRequired("runtime.RPCTimeEvaluator");
  ffi::Function::SetGlobal(
      "runtime.RPCTimeEvaluator", ffi::Function::FromPacked([time_evaluator](ffi::PackedArgs args, ffi::Any* rv) {
        bool module = args.size() == 12 && args[0].as<ffi::Module>().has_value();
        std::string preproc = args.size() == 12 ? args[11].cast<std::string>() : std::string();
        if (!module || args[0].as<ffi::Module>().value()->kind() == std::string("rpc") ||
            (!preproc.empty() && preproc != "cache_flush_cpu_non_first_arg")) {
          TVM_FFI_THROW(PermissionError) << "pock_runner serve: time_evaluator times a function of a module "
                                         << "loaded with load_module, with no pre-processing or the CPU cache flush";
        }
        time_evaluator.CallPacked(args, rv);
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

int Serve(const ServeOptions& given) {
  ServeOptions o = given;
  o.workdir = WorkDir(o.workdir);
  dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL);  // CUDA devices where the library ships
  Register(o);
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
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(listener, 16) != 0) {
    throw Error("cannot listen on " + o.host + ":" + std::to_string(o.port) + " (in use?); pick another with --port");
  }
  if (o.host.rfind("127.", 0) != 0) {
    std::printf("warning: serving on %s: anyone who can reach port %d can upload files into %s%s\n", o.host.c_str(),
                o.port, o.workdir.c_str(), o.allow_remote_code ? " and run any code on this machine" : "");
  }
  std::printf("serving TVM RPC on %s:%d, files in %s%s, at most %d sessions\n", o.host.c_str(), o.port,
              o.workdir.c_str(), o.allow_remote_code ? ", remote code allowed" : "", o.max_sessions);
  std::fflush(stdout);
  signal(SIGPIPE, SIG_IGN);
  int live = 0;
  while (true) {
    while (live > 0 && waitpid(-1, nullptr, WNOHANG) > 0) --live;
    if (live >= o.max_sessions) {  // full: the next client waits in the listen queue
      if (waitpid(-1, nullptr, 0) > 0) --live;
      continue;
    }
    int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) continue;
    pid_t child = fork();
    if (child == 0) {  // one process per session: a crash or a hang ends only this session
#ifdef __linux__
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // and no session outlives the server
      if (getppid() == 1) _exit(1);
#endif
      close(listener);
      if (!Handshake(fd, o.handshake_timeout_s)) {
        std::printf("handshake failed or timed out\n");
        std::fflush(stdout);
        _exit(1);
      }
      std::printf("session started\n");
      std::fflush(stdout);
      int code = 0;
      try {
        RpcGate(fd, o.idle_timeout_s).Serve();
      } catch (const std::exception& e) {
        std::printf("session error: %s\n", e.what());
        code = 1;
      }
      std::printf("session ended\n");
      std::fflush(stdout);
      _exit(code);
    }
    close(fd);
    if (child > 0) ++live;
  }
}

}  // namespace pock
