// A native backtrace when the process crashes (SIGSEGV / SIGBUS / SIGILL / SIGFPE / SIGABRT), on stderr, for
// machines without a debugger (a lent GPU): set GENCNP_FAST_CRASH_TRACE=1 before importing gencnp_fast._C.
// Each frame is printed as "module(symbol+offset) [address]"; scripts/gpu_check.sh resolves frames of this
// extension with addr2line. The previous handler (Python's faulthandler, under pytest) runs next, so the Python
// traceback follows.
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace gencnp_fast {
namespace {

constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
struct sigaction g_previous[sizeof(kSignals) / sizeof(kSignals[0])];

void on_crash(int sig) {
  static const char kHead[] = "\n== gencnp_fast: native backtrace (GENCNP_FAST_CRASH_TRACE) ==\n";
  ssize_t ignored = write(STDERR_FILENO, kHead, sizeof(kHead) - 1);
  (void)ignored;
  void* frames[64];
  const int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  for (size_t i = 0; i < sizeof(kSignals) / sizeof(kSignals[0]); ++i) {
    if (kSignals[i] == sig) sigaction(sig, &g_previous[i], nullptr);  // the next delivery goes to the old handler
  }
  raise(sig);
}

}  // namespace

bool install_crash_trace() {
  const char* flag = std::getenv("GENCNP_FAST_CRASH_TRACE");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) return false;
  void* warm[1];
  backtrace(warm, 1);  // loads the unwinder now: the first call may allocate, which a signal handler must not
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_crash;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_NODEFER;
  for (size_t i = 0; i < sizeof(kSignals) / sizeof(kSignals[0]); ++i) sigaction(kSignals[i], &sa, &g_previous[i]);
  return true;
}

}  // namespace gencnp_fast
