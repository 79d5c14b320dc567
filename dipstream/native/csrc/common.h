/* dipstream native kernels: what the compute kernels (gemv.c) and the read pool (pread.c)
 * share. Plain C11 + pthreads; built and loaded by dipstream/native/__init__.py. */
#ifndef DIPSTREAM_COMMON_H
#define DIPSTREAM_COMMON_H
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <sched.h>
#include <pthread.h>
#include <stdatomic.h>
#include <errno.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <unistd.h>

#define DS_API __attribute__((visibility("default")))
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() do { } while (0)
#endif


static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Start a detached thread running fn((void*)id) with the given stack size; 0 on success. */
static inline int spawn_detached(void* (*fn)(void*), int id, size_t stack)
{
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, stack);
    int rc = pthread_create(&th, &attr, fn, (void*)(intptr_t)id);
    pthread_attr_destroy(&attr);
    return rc;
}

/* IEEE half -> float, portable (the kernels' F16C paths convert 8 at a time). */
static inline float h2f(uint16_t h)
{
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, f = h & 1023u, u;
    if (e == 31) u = s | 0x7f800000u | (f << 13);
    else if (e) u = s | ((e + 112u) << 23) | (f << 13);
    else if (!f) u = s;
    else {  /* subnormal: normalise */
        e = 113;
        while (!(f & 1024u)) { f <<= 1; --e; }
        u = s | (e << 23) | ((f & 1023u) << 13);
    }
    float r;
    memcpy(&r, &u, 4);
    return r;
}

/* Entry points of gemv.c that the decode blocks (decode.c) call. */
DS_API int64_t ds_select_gemv(const float* v, int64_t n, int64_t k, const float* W, int64_t ld, int64_t m,
                              int64_t* idx, float* coef, float* out, int nthreads);
DS_API int64_t ds_select_gemv_qg(const float* v, int64_t n, int64_t k, const uint8_t* Wq, int64_t ldb, int64_t G,
                                 int bits, const void* HD, const uint16_t* HM, int64_t GI, int hk, int zp, int64_t m,
                                 int64_t* idx, float* coef, float* out, int nthreads, int act8);

#endif
