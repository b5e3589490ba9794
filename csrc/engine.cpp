// The merge engine's pipeline (readers -> buffer slots -> compute/writers), file I/O, SIMD
// dispatch and the scalar reference kernel. See engine.h for the contract.
#include "engine.h"

#include <fcntl.h>
#include <unistd.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace r7b {

constexpr size_t kMaxSources = 256;

void kernel_scalar(const Block& b) { kernel_scalar_range(b, 0); }
void gta_scalar(const GtaBlock& b) { gta_range(b, 0); }

std::vector<std::string> available_simd() {
  std::vector<std::string> out{"scalar"};
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#ifdef R7B_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    out.push_back("avx2");
#endif
#ifdef R7B_HAVE_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
    out.push_back("avx512");
#endif
#endif
  return out;
}

std::string choose_simd(const std::string& request) {
  std::string want = request;
  if (want.empty() || want == "auto") {
    const char* env = std::getenv("R7B_MERGE_SIMD");
    want = (env && *env) ? env : "auto";
  }
  const auto avail = available_simd();
  if (want == "auto") return avail.back();
  if (want != "scalar" && want != "avx2" && want != "avx512")
    throw std::invalid_argument("simd (or R7B_MERGE_SIMD) must be auto, scalar, avx2 or avx512, got '" + want + "'");
  if (std::find(avail.begin(), avail.end(), want) == avail.end())
    throw std::invalid_argument("SIMD path '" + want + "' is not available on this CPU/build");
  return want;
}

static KernelFn kernel_for(const std::string& simd) {
#ifdef R7B_HAVE_AVX512
  if (simd == "avx512") return kernel_avx512;
#endif
#ifdef R7B_HAVE_AVX2
  if (simd == "avx2") return kernel_avx2;
#endif
  (void)simd;
  return kernel_scalar;
}

static GtaFn gta_for(const std::string& simd) {
#ifdef R7B_HAVE_AVX512
  if (simd == "avx512") return gta_avx512;
#endif
#ifdef R7B_HAVE_AVX2
  if (simd == "avx2") return gta_avx2;
#endif
  (void)simd;
  return gta_scalar;
}

static std::string errno_msg(const char* what, const std::string& path) {
  return std::string(what) + " '" + path + "': " + std::strerror(errno);
}

void pread_full(int fd, char* dst, int64_t n, int64_t off, const std::string& path) {
  while (n > 0) {
    const ssize_t r = ::pread(fd, dst, size_t(n), off);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno_msg("read failed on", path));
    }
    if (r == 0) throw IoError("unexpected end of file in '" + path + "' at byte " + std::to_string(off));
    dst += r;
    n -= r;
    off += r;
  }
}

static void pwrite_full(int fd, const char* src, int64_t n, int64_t off, const std::string& path) {
  while (n > 0) {
    const ssize_t r = ::pwrite(fd, src, size_t(n), off);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno_msg("write failed on", path));
    }
    src += r;
    n -= r;
    off += r;
  }
}

Engine::Engine(std::vector<std::string> inputs, std::vector<std::string> outputs, std::vector<Task> tasks,
               int threads, int64_t chunk_bytes, const std::string& simd)
    : inputs_(std::move(inputs)), outputs_(std::move(outputs)), tasks_(std::move(tasks)),
      threads_(threads), chunk_bytes_(chunk_bytes) {
  if (threads_ < 1) throw std::invalid_argument("threads must be >= 1");
  if (chunk_bytes_ < 64 || chunk_bytes_ % 4) throw std::invalid_argument("chunk_bytes must be a multiple of 4, >= 64");
  simd_ = choose_simd(simd);
  kernel_ = kernel_for(simd_);
  gta_ = gta_for(simd_);
  for (size_t t = 0; t < tasks_.size(); ++t) {
    const Task& k = tasks_[t];
    const size_t ns = k.src_file.size();
    if (ns == 0 || k.src_off.size() != ns || (k.kind == kMerge && k.coef.size() != ns))
      throw std::invalid_argument("task '" + k.name + "': sources, offsets and coefficients disagree");
    if (k.kind != kMerge && k.kind != kCopy) throw std::invalid_argument("task '" + k.name + "': bad kind");
    if (k.out_file < 0 || size_t(k.out_file) >= outputs_.size() || k.numel < 0 || k.out_off < 0)
      throw std::invalid_argument("task '" + k.name + "': bad output file, offset or size");
    for (size_t j = 0; j < ns; ++j)
      if (k.src_file[j] < 0 || size_t(k.src_file[j]) >= inputs_.size() || k.src_off[j] < 0)
        throw std::invalid_argument("task '" + k.name + "': bad input file or offset");
    if (k.kind == kMerge && (k.in_dt < kF32 || k.in_dt > kBF16 || k.out_dt < kF32 || k.out_dt > kBF16))
      throw std::invalid_argument("task '" + k.name + "': bad dtype");
    if (ns > kMaxSources) throw std::invalid_argument("task '" + k.name + "': more than 256 sources");
    check_method(k);
    max_src_ = std::max(max_src_, ns);
    // elements per chunk: each input buffer and the output buffer hold at most chunk_bytes
    const int64_t step = k.kind == kMerge ? chunk_bytes_ / std::max(dtype_size(k.in_dt), dtype_size(k.out_dt))
                                          : chunk_bytes_;
    total_ += uint64_t(k.kind == kMerge ? k.numel * dtype_size(k.out_dt) : k.numel);
    for (int64_t b = 0; b < k.numel; b += step) chunks_.push_back({int(t), b, std::min(step, k.numel - b)});
  }
}

void Engine::fail(const std::exception_ptr& e) {
  {
    std::lock_guard<std::mutex> g(err_mu_);
    if (!error_) error_ = e;
  }
  abort_.store(true);
  std::lock_guard<std::mutex> g(mu_);
  cv_free_.notify_all();
  cv_ready_.notify_all();
}

void Engine::read_chunk(const Chunk& c, Slot& s) {
  const Task& k = tasks_[c.task];
  const int64_t isz = k.kind == kMerge ? dtype_size(k.in_dt) : 1;
  for (size_t j = 0; j < k.src_file.size(); ++j) {
    const int f = k.src_file[j];
    pread_full(in_fd_[f], s.buf.data() + j * chunk_bytes_, c.count * isz, k.src_off[j] + c.begin * isz, inputs_[f]);
  }
}

void Engine::compute_chunk(const Chunk& c, Slot& s) {
  const Task& k = tasks_[c.task];
  const size_t ns = k.src_file.size();
  const char* out;
  int64_t nbytes, off;
  if (k.kind == kCopy) {
    for (size_t j = 1; j < ns; ++j)
      if (std::memcmp(s.buf.data(), s.buf.data() + j * chunk_bytes_, size_t(c.count)) != 0)
        throw DataError("non-floating tensor '" + k.name + "' differs between '" + inputs_[k.src_file[0]] +
                        "' and '" + inputs_[k.src_file[j]] + "'");
    out = s.buf.data();
    nbytes = c.count;
    off = k.out_off + c.begin;
  } else {
    const void* src[kMaxSources];
    for (size_t j = 0; j < ns; ++j) src[j] = s.buf.data() + j * chunk_bytes_;
    char* dst = s.buf.data() + max_src_ * chunk_bytes_;
    if (k.method == kLinear)
      kernel_(Block{src, k.coef.data(), int(ns), k.in_dt, k.out_dt, size_t(c.count), dst});
    else
      compute_method(k, c, src, dst);
    out = dst;
    nbytes = c.count * dtype_size(k.out_dt);
    off = k.out_off + c.begin * dtype_size(k.out_dt);
  }
  pwrite_full(out_fd_[k.out_file], out, nbytes, off, outputs_[k.out_file]);
  done_.fetch_add(uint64_t(nbytes));
}

void Engine::reader_loop() {
  try {
    for (;;) {
      const size_t i = next_chunk_.fetch_add(1);
      if (i >= chunks_.size() || abort_.load()) break;
      int slot;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_free_.wait(g, [&] { return !free_.empty() || abort_.load(); });
        if (abort_.load()) break;
        slot = free_.back();
        free_.pop_back();
      }
      slots_[slot].chunk = int(i);
      read_chunk(chunks_[i], slots_[slot]);
      std::lock_guard<std::mutex> g(mu_);
      ready_.push_back(slot);
      cv_ready_.notify_one();
    }
  } catch (...) {
    fail(std::current_exception());
  }
  std::lock_guard<std::mutex> g(mu_);
  --readers_left_;
  cv_ready_.notify_all();
}

void Engine::compute_loop() {
  _mm_setcsr(0x1f80);  // default rounding, no flush-to-zero: every thread computes the same bits
  try {
    for (;;) {
      int slot;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_ready_.wait(g, [&] { return !ready_.empty() || readers_left_ == 0 || abort_.load(); });
        if (abort_.load() || ready_.empty()) break;
        slot = ready_.back();
        ready_.pop_back();
      }
      compute_chunk(chunks_[slots_[slot].chunk], slots_[slot]);
      std::lock_guard<std::mutex> g(mu_);
      free_.push_back(slot);
      cv_free_.notify_one();
    }
  } catch (...) {
    fail(std::current_exception());
  }
}

void Engine::run() {
  struct Fds {
    std::vector<int>& v;
    ~Fds() {
      for (int fd : v)
        if (fd >= 0) ::close(fd);
      v.clear();
    }
  };
  Fds in_guard{in_fd_}, out_guard{out_fd_};
  for (const auto& p : inputs_) {
    const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError(errno_msg("cannot open input", p));
    in_fd_.push_back(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  }
  for (const auto& p : outputs_) {
    const int fd = ::open(p.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) throw IoError(errno_msg("cannot open output", p));
    out_fd_.push_back(fd);
  }
  prepare();  // per-tensor statistics of TIES / DARE / SLERP tasks (engine_methods.cpp)
  if (error_) std::rethrow_exception(error_);
  if (abort_.load()) throw std::runtime_error("merge cancelled");
  const int nslots = 2 * threads_;
  slots_.assign(size_t(nslots), Slot{});
  free_.clear();
  ready_.clear();
  for (int i = 0; i < nslots; ++i) {
    slots_[i].buf.resize((max_src_ + 1) * size_t(chunk_bytes_));
    free_.push_back(i);
  }
  readers_left_ = threads_;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads_; ++t) pool.emplace_back([this] { reader_loop(); });
  for (int t = 0; t < threads_; ++t) pool.emplace_back([this] { compute_loop(); });
  for (auto& th : pool) th.join();
  slots_.clear();
  if (error_) std::rethrow_exception(error_);
  if (abort_.load()) throw std::runtime_error("merge cancelled");
}

}  // namespace r7b
