#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/mman.h>
#include <unistd.h>
#include <time.h>
static long long ns(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1000000000LL+t.tv_nsec;}
int main(int argc,char**argv){
  size_t S = atol(argv[1]), blk = atol(argv[2]); int huge = argc>3;
  char *src = aligned_alloc(1<<21, S), *scr = aligned_alloc(4096, blk);
  if (huge) madvise(src, S, MADV_HUGEPAGE);
  memset(src, 1, S); memset(scr, 0, blk);
  pid_t me = getpid();
  long long best_c=1e18, best_m=1e18;
  for (int r=0;r<200;r++){
    long long t0=ns();
    for(size_t a=0;a<S;a+=blk){struct iovec l={scr,blk},rr={src+a,blk}; if(process_vm_readv(me,&l,1,&rr,1,0)!=(ssize_t)blk){perror("readv");return 1;}}
    long long t1=ns();
    for(size_t a=0;a<S;a+=blk){memcpy(scr,src+a,blk); __asm__ volatile(""::"r"(scr):"memory");}
    long long t2=ns();
    if(t1-t0<best_c)best_c=t1-t0; if(t2-t1<best_m)best_m=t2-t1;
  }
  printf("S=%zuK blk=%zuK huge=%d: cma %.1f us (%.0f ns/page)  memcpy %.1f us\n",S>>10,blk>>10,huge,best_c/1e3,(best_c-best_m)/(S/4096.0),best_m/1e3);
}
