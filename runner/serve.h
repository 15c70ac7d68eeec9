// `pock_runner serve`: TVM RPC for the host's `pock-tvm run --rpc` (see serve.cc for the limits).
#pragma once

#include <string>
#include <vector>

namespace pock {

struct ServeOptions {
  std::string host = "127.0.0.1";           // loopback unless told otherwise
  int port = 9090;
  std::string workdir;                      // uploads, downloads and removals stay inside;
                                            // empty: a fresh private temporary directory
  bool allow_remote_code = false;           // load any uploaded library (autotuning)
  std::vector<std::string> trusted_bundles; // else only libraries with these bundles' SHA-256
  int handshake_timeout_s = 10;             // for the whole handshake
  int max_sessions = 4;                     // concurrent sessions, each its own process
  int idle_timeout_s = 300;
};

// Serves one client after another until killed; throws Error if it cannot listen.
int Serve(const ServeOptions& options);

}  // namespace pock
