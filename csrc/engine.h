// The streaming merge engine: executes a plan made in Python (r7b_fast/merge.py).
//
// A plan is a list of tasks, one per output tensor. A MERGE task reads `numel` elements of dtype
// `in_dt` at `src_off[j]` in input file `src_file[j]` for every source j, and writes
// sum_j coef[j] * x_j (fp32 fused multiply-adds in source order, rounded to nearest even) as
// `out_dt` at `out_off` in output file `out_file`. A COPY task (non-floating tensors) reads
// `numel` bytes from every source, checks that they are equal, and writes them. A kMerge task
// whose `method` is kGta (TIES / DARE) or kSlerp first gets per-tensor statistics in
// Engine::prepare (engine_methods.cpp), then goes through the same chunk pipeline with the
// method's element kernel (kernels.h gta_range; SLERP through the linear kernel).
//
// Execution: tasks are cut into chunks of at most `chunk_bytes` bytes per buffer. `threads` reader
// threads pread every source of a chunk into a free buffer slot; `threads` compute threads
// combine and pwrite it. There are 2 * threads slots, so reading overlaps computing and memory
// stays at 2 * threads * (max sources + 1) * chunk_bytes whatever the model size (plus, for
// TIES, one fp32 copy of the largest trimmed tensor during Engine::prepare).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace r7b {

// An input/output failure; the message names the file. Raised in Python as OSError.
struct IoError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Inconsistent data (e.g. a non-floating tensor that differs between models); ValueError.
struct DataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum TaskKind : int { kMerge = 0, kCopy = 1 };
// How a kMerge task combines its sources (engine_methods.cpp has the per-tensor passes):
// kLinear: sum_j coef[j] * x_j. kGta (TIES / DARE): source 0 is the base, coef[j] (j >= 1) the
// expert weights; see kernels.h gta_range. kSlerp: source 0 the base, source 1 the other model,
// interpolated row by row (`rows` rows of numel / rows elements) with per-row coefficients.
enum Method : int { kLinear = 0, kGta = 1, kSlerp = 2 };

struct Task {
  std::string name;
  int kind = kMerge;
  int out_file = 0;
  int64_t out_off = 0;
  int out_dt = kF32;
  int64_t numel = 0;  // elements (kMerge) or bytes (kCopy)
  std::vector<int> src_file;
  std::vector<int64_t> src_off;
  int in_dt = kF32;
  std::vector<float> coef;
  // kGta / kSlerp parameters (set by Python; `density`, `key` indexed like the sources).
  int method = kLinear;
  int sparsify = kKeepAll;  // kKeepAll | kMagnitude (TIES trim) | kRandom (DARE drop)
  bool consensus = false;   // TIES sign election
  bool rescale = false;     // L1-norm rescale of each sparsified task vector (mergekit)
  bool normalize = false;
  float divisor = 1.0f;     // kGta without consensus: the normalize divisor (sum of weights)
  std::vector<double> density;
  std::vector<uint64_t> key;  // DARE: per-source hash key
  int64_t rows = 1;           // kSlerp
  double t = 0.5;             // kSlerp
  // Filled by Engine::prepare (one per source): magnitude threshold, tie cut index, L1 scale;
  // kSlerp: one (coef_base, coef_other) pair per row.
  std::vector<float> thr, scale, row_coef;
  std::vector<int64_t> cut;
  std::vector<double> dthr;      // DARE: keep iff draw < density * 2^24 ...
  std::vector<uint32_t> dbound;  // ... iff draw < ceil(density * 2^24)
};

// Names of the SIMD paths compiled in and supported by this CPU, best last.
std::vector<std::string> available_simd();
// The path to use: `request` ("auto", "scalar", "avx2", "avx512"); "auto" honours the
// R7B_MERGE_SIMD environment variable, else the best available. Throws std::invalid_argument.
std::string choose_simd(const std::string& request);

// Reads exactly n bytes at `off` (retrying short reads); IoError naming `path` on failure or EOF.
void pread_full(int fd, char* dst, int64_t n, int64_t off, const std::string& path);

// Throws std::invalid_argument if a task's method parameters are inconsistent.
void check_method(const Task& k);

class Engine {
 public:
  Engine(std::vector<std::string> inputs, std::vector<std::string> outputs, std::vector<Task> tasks,
         int threads, int64_t chunk_bytes, const std::string& simd);
  // Runs the plan to completion (call without the GIL). Throws IoError / DataError.
  void run();
  void cancel() { abort_.store(true); }
  uint64_t done_bytes() const { return done_.load(); }
  uint64_t total_bytes() const { return total_; }
  const std::string& simd() const { return simd_; }
  int threads() const { return threads_; }

 private:
  struct Chunk {
    int task;
    int64_t begin;  // element (or byte) offset inside the task
    int64_t count;
  };
  struct Slot {
    std::vector<char> buf;  // max_sources input buffers, then the output buffer
    int chunk = -1;
  };
  void reader_loop();
  void compute_loop();
  void read_chunk(const Chunk& c, Slot& s);
  void compute_chunk(const Chunk& c, Slot& s);
  // Per-tensor passes of kGta / kSlerp tasks (engine_methods.cpp), before the chunk pipeline.
  void prepare();
  void prepare_task(Task& k);
  void prepare_gta(Task& k);
  void prepare_slerp(Task& k);
  void read_floats(const Task& k, size_t j, int64_t begin, int64_t count, std::vector<char>& raw, float* dst);
  void compute_method(const Task& k, const Chunk& c, const void* const* src, char* dst);
  void fail(const std::exception_ptr& e);

  std::vector<std::string> inputs_, outputs_;
  std::vector<Task> tasks_;
  std::vector<Chunk> chunks_;
  std::vector<int> in_fd_, out_fd_;
  int threads_;
  int64_t chunk_bytes_;
  size_t max_src_ = 1;
  std::string simd_;
  KernelFn kernel_;
  GtaFn gta_;
  uint64_t total_ = 0;

  std::atomic<uint64_t> done_{0};
  std::atomic<bool> abort_{false};
  std::atomic<size_t> next_chunk_{0};
  std::exception_ptr error_;
  std::mutex err_mu_;
  // TIES trims: |tau| of one whole tensor, shared by the prepare threads one at a time.
  std::mutex scratch_mu_;
  std::vector<float> scratch_;

  // Slot queues: `free_` slots wait for a reader, `ready_` slots for a compute thread.
  std::vector<Slot> slots_;
  std::vector<int> free_, ready_;
  int readers_left_ = 0;
  std::mutex mu_;
  std::condition_variable cv_free_, cv_ready_;
};

}  // namespace r7b
