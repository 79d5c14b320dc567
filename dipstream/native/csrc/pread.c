/* The read pool: batched positioned reads (pread) of many extents of one file with a few I/O
 * threads in flight, synchronous (ds_pread_batch) or started and collected later
 * (ds_pread_submit / ds_pread_wait). */
#include "common.h"

/* ---------------------------------------------------------------- batched positioned reads
 * ds_pread_batch reads n (offset, length) extents of fd into n destination addresses with up to
 * nthreads reads in flight: the caller and sleeping I/O threads claim extents (one CAS each);
 * the call returns when all are done.  Short reads are continued; end of file is EIO.  Returns
 * 0 or the first errno. */
#define IO_MAX_THREADS 64
typedef struct { int fd; const int64_t* off; const int64_t* len; const int64_t* dst; } iojob_t;
static iojob_t g_io;
static _Atomic uint64_t g_io_state;   /* generation:24 | n:20 | next:20 */
static _Atomic int64_t g_io_done;
static _Atomic int g_io_err;
static _Atomic int g_io_active;
static uint32_t g_io_gen;
static int g_io_nthreads;
static pthread_mutex_t g_io_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_io_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_io_call_mu = PTHREAD_MUTEX_INITIALIZER;
#define IO_NMASK ((1u << 20) - 1u)

static int io_claim(uint32_t* gen)
{
    uint64_t s = atomic_load(&g_io_state);
    for (;;) {
        uint32_t n = (uint32_t)(s >> 20) & IO_NMASK, next = (uint32_t)s & IO_NMASK;
        if (next >= n) return -1;
        if (atomic_compare_exchange_weak(&g_io_state, &s, s + 1)) {
            if (gen) *gen = (uint32_t)(s >> 40);
            return (int)next;
        }
    }
}

static int do_pread(int fd, char* p, int64_t len, int64_t off)
{
    while (len > 0) {
        ssize_t r = pread(fd, p, (size_t)len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (r == 0) return EIO;
        p += r; len -= r; off += r;
    }
    return 0;
}

static _Atomic int64_t g_io_end_ns;

static void io_run(int i)
{
    int e = do_pread(g_io.fd, (char*)(intptr_t)g_io.dst[i], g_io.len[i], g_io.off[i]);
    if (e) {
        int zero = 0;
        atomic_compare_exchange_strong(&g_io_err, &zero, e);
    }
    int64_t t = now_ns();
    int64_t prev = atomic_load(&g_io_end_ns);
    while (prev < t && !atomic_compare_exchange_weak(&g_io_end_ns, &prev, t)) {}
    atomic_fetch_add(&g_io_done, 1);
}

static void* io_main(void* arg)
{
    int id = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&g_io_mu);
        while ((uint32_t)(atomic_load(&g_io_state) >> 40) == seen || id >= atomic_load(&g_io_active))
            pthread_cond_wait(&g_io_cv, &g_io_mu);
        seen = (uint32_t)(atomic_load(&g_io_state) >> 40);
        pthread_mutex_unlock(&g_io_mu);
        int i;
        while ((i = io_claim(NULL)) >= 0) io_run(i);
    }
    return NULL;
}

static void io_atfork_child(void)
{
    g_io_nthreads = 0;
    atomic_store(&g_io_state, 0);
    atomic_store(&g_io_active, 0);
    g_io_gen = 0;
    pthread_mutex_init(&g_io_mu, NULL);
    pthread_cond_init(&g_io_cv, NULL);
    pthread_mutex_init(&g_io_call_mu, NULL);
}

static int g_io_atfork;

DS_API int ds_pread_batch(int fd, int64_t n, const int64_t* off, const int64_t* len,
                          const int64_t* dst, int nthreads)
{
    if (n <= 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > IO_MAX_THREADS) nthreads = IO_MAX_THREADS;
    pthread_mutex_lock(&g_io_call_mu);
    if (!g_io_atfork) { pthread_atfork(NULL, NULL, io_atfork_child); g_io_atfork = 1; }
    while (g_io_nthreads < nthreads - 1 && spawn_detached(io_main, g_io_nthreads, 1 << 18) == 0)
        g_io_nthreads++;
    int err = 0;
    for (int64_t base = 0; base < n && !err; base += IO_NMASK) {
        int64_t cnt = n - base < IO_NMASK ? n - base : IO_NMASK;
        iojob_t j = {fd, off + base, len + base, dst + base};
        g_io = j;
        atomic_store(&g_io_done, 0);
        atomic_store(&g_io_err, 0);
        g_io_gen = (g_io_gen + 1) & 0xffffffu;
        if (g_io_gen == 0) g_io_gen = 1;
        pthread_mutex_lock(&g_io_mu);
        atomic_store(&g_io_active, cnt > 1 ? nthreads - 1 : 0);
        atomic_store(&g_io_state, ((uint64_t)g_io_gen << 40) | ((uint64_t)cnt << 20));
        pthread_cond_broadcast(&g_io_cv);
        pthread_mutex_unlock(&g_io_mu);
        int i;
        while ((i = io_claim(NULL)) >= 0) io_run(i);
        for (int spins = 0; atomic_load(&g_io_done) < cnt; ++spins) {
            if (spins < 256) CPU_RELAX(); else sched_yield();
        }
        err = atomic_load(&g_io_err);
    }
    pthread_mutex_unlock(&g_io_call_mu);
    return err;
}

/* Asynchronous variant: ds_pread_submit hands all n extents (n < 2^20) to the I/O threads and
 * returns at once; ds_pread_wait blocks until they are read and returns 0 or the first errno,
 * with the CLOCK_MONOTONIC time (ns) at which the last read finished in *end_ns.  The arrays
 * must stay alive until the wait.  One submission at a time (the call lock is held in between
 * and must be released by ds_pread_wait from the same thread). */
static int64_t g_io_cnt;

DS_API int ds_pread_submit(int fd, int64_t n, const int64_t* off, const int64_t* len,
                           const int64_t* dst, int nthreads)
{
    if (n <= 0 || n >= (int64_t)IO_NMASK) return EINVAL;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > IO_MAX_THREADS) nthreads = IO_MAX_THREADS;
    pthread_mutex_lock(&g_io_call_mu);
    if (!g_io_atfork) { pthread_atfork(NULL, NULL, io_atfork_child); g_io_atfork = 1; }
    while (g_io_nthreads < nthreads && spawn_detached(io_main, g_io_nthreads, 1 << 18) == 0)
        g_io_nthreads++;
    if (g_io_nthreads < 1) {  /* no thread could be started: read now */
        pthread_mutex_unlock(&g_io_call_mu);
        int e = ds_pread_batch(fd, n, off, len, dst, 1);
        pthread_mutex_lock(&g_io_call_mu);
        atomic_store(&g_io_err, e);
        g_io_cnt = 0;
        atomic_store(&g_io_end_ns, now_ns());
        return 0;
    }
    iojob_t j = {fd, off, len, dst};
    g_io = j;
    g_io_cnt = n;
    atomic_store(&g_io_done, 0);
    atomic_store(&g_io_err, 0);
    atomic_store(&g_io_end_ns, 0);
    g_io_gen = (g_io_gen + 1) & 0xffffffu;
    if (g_io_gen == 0) g_io_gen = 1;
    /* threads 0 .. active-1 may read: nthreads of them, even where an earlier call with a
     * larger nthreads (ds_pread_batch's or this one's) left more in the pool */
    int active = nthreads < g_io_nthreads ? nthreads : g_io_nthreads;
    int wake = (int)(n < active ? n : active);
    pthread_mutex_lock(&g_io_mu);
    atomic_store(&g_io_active, active);
    atomic_store(&g_io_state, ((uint64_t)g_io_gen << 40) | ((uint64_t)n << 20));
    pthread_mutex_unlock(&g_io_mu);
    /* wake only as many I/O threads as there are reads (signals after the unlock: the woken
     * threads do not then queue on the mutex); a signal may wake any sleeper, so with threads
     * beyond the active ones in the pool all are woken and those not active sleep again.
     * ds_pread_wait's caller-runs loop covers any read no thread claimed */
    if (active < g_io_nthreads) pthread_cond_broadcast(&g_io_cv);
    else for (int w = 0; w < wake; ++w) pthread_cond_signal(&g_io_cv);
    return 0;
}

DS_API int ds_pread_wait(int64_t* end_ns)
{
    int64_t cnt = g_io_cnt;
    int i;
    /* caller-runs: reads no I/O thread has claimed yet are done here (a descheduled I/O thread
     * on a busy machine then costs parallelism, not a stall) */
    if (cnt > 0)
        while ((i = io_claim(NULL)) >= 0) io_run(i);
    for (int spins = 0; atomic_load(&g_io_done) < cnt; ++spins) {
        if (spins < 256) CPU_RELAX(); else sched_yield();
    }
    int err = atomic_load(&g_io_err);
    if (end_ns) *end_ns = atomic_load(&g_io_end_ns);
    pthread_mutex_unlock(&g_io_call_mu);
    return err;
}

