/* Single-core, in-L1 microkernel rates on AVX2/FMA: a dense 6x16 broadcast-activation GEMM microkernel (what oneDNN/MLAS
 * run), a 2:4 kernel that selects the kept input of each group of 4 in registers (vpermilps, weights vectorised over
 * 8 output channels), and the current broadcast-weight row64 SpMM row of condensed.c. Alternated, best of 40.
 *   cd benchmarks && gcc -O3 -march=haswell -mtune=native -fopenmp microkernels_avx2.c -o /tmp/mk && taskset -c 1 /tmp/mk */
#include "../src/semisparse/runtime/cpu/kernels/condensed.c"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
/* K inputs, 6 (dense) or 4 (2:4) positions held in registers, all in L1 */
#define K 512
float X[8][K] __attribute__((aligned(64)));
float Wd[K][16] __attribute__((aligned(64)));
float W0[K/4][8] __attribute__((aligned(64))), W1[K/4][8] __attribute__((aligned(64)));
int I0[K/4][8] __attribute__((aligned(64))), I1[K/4][8] __attribute__((aligned(64)));
float out[16*8] __attribute__((aligned(64)));
__attribute__((noinline)) void dense6x16(void){
  __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,b0=a0,b1=a0,b2=a0,b3=a0,b4=a0,b5=a0;
  for(int k=0;k<K;k++){ __m256 w=_mm256_load_ps(Wd[k]), v=_mm256_load_ps(Wd[k]+8), x;
#define D(P,A,B) x=_mm256_broadcast_ss(&X[P][k]); A=_mm256_fmadd_ps(w,x,A); B=_mm256_fmadd_ps(v,x,B);
   D(0,a0,b0)D(1,a1,b1)D(2,a2,b2)D(3,a3,b3)D(4,a4,b4)D(5,a5,b5)}
  _mm256_store_ps(out,_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0,a1),_mm256_add_ps(a2,a3)),_mm256_add_ps(_mm256_add_ps(a4,a5),_mm256_add_ps(_mm256_add_ps(b0,b1),_mm256_add_ps(_mm256_add_ps(b2,b3),_mm256_add_ps(b4,b5))))));
}
__attribute__((noinline)) void perm24(void){ /* 8 outputs x 5 positions, 2 accumulators each */
  __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0,a4=a0,c0=a0,c1=a0,c2=a0,c3=a0,c4=a0;
  for(int g=0;g<K/4;g++){ __m256 w0=_mm256_load_ps(W0[g]), w1=_mm256_load_ps(W1[g]);
    __m256i i0=_mm256_load_si256((const __m256i*)I0[g]), i1=_mm256_load_si256((const __m256i*)I1[g]); __m256 xb;
#define Q(P,A,C) xb=_mm256_broadcast_ps((const __m128*)&X[P][4*g]); A=_mm256_fmadd_ps(w0,_mm256_permutevar_ps(xb,i0),A); C=_mm256_fmadd_ps(w1,_mm256_permutevar_ps(xb,i1),C);
    Q(0,a0,c0)Q(1,a1,c1)Q(2,a2,c2)Q(3,a3,c3)Q(4,a4,c4)}
  _mm256_store_ps(out+8,_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0,a1),_mm256_add_ps(a2,a3)),_mm256_add_ps(_mm256_add_ps(a4,c4),_mm256_add_ps(_mm256_add_ps(c0,c1),_mm256_add_ps(c2,c3)))));
}
float XB[64*64+64] __attribute__((aligned(64))); float WR[64*32]; int32_t OFF[64*32]; float YR[64*64] __attribute__((aligned(64)));
__attribute__((noinline)) void bcast(void){ for(int r=0;r<64;r++) row64(XB, WR+r*32, OFF+r*32, 32, 0.f, YR+r*64, 1, 64); }
int main(){
  for(int i=0;i<64*64+64;i++)XB[i]=0.001f*(i%11); for(int r=0;r<64;r++)for(int j=0;j<32;j++){WR[r*32+j]=0.01f; OFF[r*32+j]=((r*7+j*2+(j&1))%64)*64;}
  for(int p=0;p<8;p++)for(int k=0;k<K;k++)X[p][k]=0.001f*(k%13);
  for(int k=0;k<K;k++)for(int o=0;o<16;o++)Wd[k][o]=0.01f;
  for(int g=0;g<K/4;g++)for(int o=0;o<8;o++){W0[g][o]=0.01f;W1[g][o]=0.02f;I0[g][o]=(o+g)%2;I1[g][o]=2+(o+g)%2;}
  int n=100000, nb=n*K*6*16/(64*32*64); double bd=1e9,bp=1e9,bb=1e9;
  for(int rep=0;rep<40;rep++){
    double t=now(); for(int i=0;i<n;i++) dense6x16(); t=now()-t; if(t<bd)bd=t;
    t=now(); for(int i=0;i<n;i++) perm24(); t=now()-t; if(t<bp)bp=t;
    t=now(); for(int i=0;i<nb;i++) bcast(); t=now()-t; if(t<bb)bb=t;
  }
  double dmac=6.0*16*K*n, pdense=5.0*8*K*n; /* dense-equivalent MACs */
  printf("dense 6x16 microkernel: %.1f GFLOP/s; 2:4 vpermilps 8x5: %.1f dense-equivalent GFLOP/s (%.1f useful); 2:4/dense time ratio for equal dense work: %.2fx\n",
    2*dmac/bd/1e9, 2*pdense/bp/1e9, pdense/bp/1e9, (2*pdense/bp)/(2*dmac/bd));
  printf("current broadcast-weight row64 (in L1, 2:4-like k=32 of 64 channels): %.1f useful GFLOP/s = %.2f of the dense microkernel's rate\n", 2.0*64*32*64*nb/bb/1e9, (2.0*64*32*64*nb/bb)/(2*dmac/bd));
  return out[3]>1e30 || YR[7]>1e30;
}
