/* dipstream native kernels: what the compute kernels (gemv.c) and the read pool (pread.c)
 * share. Plain C11 + pthreads; built and loaded by dipstream/kernels/native.py. */
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

#endif
