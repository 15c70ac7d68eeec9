// The allow-list between a client's socket and TVM's RPC server loop (see rpc_gate.cc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pock {

// The remote functions a client may ask for by name: files inside the work dir, loading a
// library (itself checked against --trust), a module's functions, timing and random fill.
// Everything else a client names is refused before TVM's server sees the request.
bool AllowedRemoteFunction(const std::string& name);

// Writes all `n` bytes to the socket `fd` (no SIGPIPE); false if the peer is gone.
bool SendAll(int fd, const void* buf, size_t n);

// Reads the client's packets from `fd` and hands them to TVM's server loop (`rpc.ServerLoop` with a
// send and a receive callback): a request for a global function off the allow-list, or a session
// constructor (an RPC proxy such as `rpc.Connect`), is answered with an error without reaching TVM.
// A client silent for `idle_timeout_s` seconds ends the session.
class RpcGate {
 public:
  RpcGate(int fd, int idle_timeout_s) : fd_(fd), idle_timeout_s_(idle_timeout_s) {}
  // Runs the session until the client shuts it down or disconnects; throws on a protocol error.
  void Serve();

 private:
  std::string Receive(int64_t size);    // frecv: the next bytes for TVM, at most `size`
  bool NextPacket();                    // reads and inspects one packet; false when the client is gone
  bool Refuse(const std::string& why);  // answers the pending request with an RPC exception
  bool ReadExact(void* buf, size_t n);

  int fd_;
  int idle_timeout_s_;
  std::string ready_;          // bytes inspected and ready for TVM
  size_t ready_at_ = 0;
  uint64_t passthrough_ = 0;   // bytes of the current packet that go to TVM uninspected
};

}  // namespace pock
