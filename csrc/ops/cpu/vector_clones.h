// DCNV2_VECTOR_CLONES compiles a function once per x86-64 level (AVX-512,
// AVX2 + FMA, baseline SSE2) and lets the loader pick the best one for the
// machine (GCC's target_clones), so the channel loops run at the CPU's
// vector width while the extension still runs on any x86-64 CPU. Elsewhere
// it is empty: the functions are compiled for the build's target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DCNV2_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCNV2_VECTOR_CLONES
#endif
