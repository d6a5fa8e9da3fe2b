/* attncc: run a TVM module's parallel loops on the OpenMP team of the calling thread.
 *
 * A TVM module calls its parallel loops through the function pointer
 * __TVMBackendParallelLaunch, which TVM's runtime fills in with its own thread pool when the
 * module is loaded. attncc points it at attncc_parallel_launch instead, so generated kernels
 * run on torch's OpenMP threads (see openmp.py for why). libgomp's entry points are passed in
 * by the loader (attncc_bind), so this file links against nothing: the functions are those of
 * the libgomp copy torch itself loaded.
 */
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelGroupEnv; /* TVMParallelGroupEnv, tvm/runtime/c_backend_api.h */

typedef int (*ParallelLambda)(int task_id, ParallelGroupEnv* penv, void* cdata);
typedef void (*GompParallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
typedef int (*OmpInt)(void);

static GompParallel gomp_parallel;
static OmpInt omp_thread_num;
static OmpInt omp_num_threads;
static volatile int last_team = 0;

void attncc_bind(void* parallel, void* thread_num, void* num_threads) {
  gomp_parallel = (GompParallel)parallel;
  omp_thread_num = (OmpInt)thread_num;
  omp_num_threads = (OmpInt)num_threads;
}

/* The size of the last team a launch ran on (for tests). */
int attncc_last_team(void) { return last_team; }

typedef struct {
  ParallelLambda lambda;
  void* cdata;
  volatile int failed;
} Launch;

static void run_member(void* data) {
  Launch* launch = (Launch*)data;
  int team = omp_num_threads();
  ParallelGroupEnv env = {0, team};
  if (omp_thread_num() == 0) last_team = team;
  if (launch->lambda(omp_thread_num(), &env, launch->cdata) != 0) launch->failed = 1;
}

/* TVMBackendParallelLaunch's signature. num_task is TVM's hint (0: as many as it likes); the
 * team is the caller's OpenMP default (torch.get_num_threads() on the thread that calls). */
int attncc_parallel_launch(ParallelLambda lambda, void* cdata, int num_task) {
  Launch launch = {lambda, cdata, 0};
  (void)num_task;
  gomp_parallel(run_member, &launch, 0, 0);
  return launch.failed ? -1 : 0;
}

#ifdef __cplusplus
}
#endif
