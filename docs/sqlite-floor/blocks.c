/* Spans stored in blocks (BENCHMARKS.md, Collector ingest): one row per 512 spans (a 60 KiB
 * stand-in for their compressed encoding) plus one key row per span (tenant, trace id, span id ->
 * block) for de-duplication and lookup, random trace ids. cc -O2 blocks.c -o blocks -lsqlite3
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
static double cpu(){struct rusage u;getrusage(RUSAGE_SELF,&u);return u.ru_utime.tv_sec+u.ru_stime.tv_sec+(u.ru_utime.tv_usec+u.ru_stime.tv_usec)/1e6;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(){ int N=204800; remove("k.db");remove("k.db-wal");remove("k.db-shm");
  sqlite3*db; sqlite3_open("k.db",&db);
  sqlite3_exec(db,"pragma journal_mode=wal;pragma synchronous=full;pragma cache_size=-65536;"
   "CREATE TABLE span_blocks (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, min_start INTEGER, max_start INTEGER, data BLOB NOT NULL);"
   "CREATE INDEX blocks_by_time ON span_blocks(tenant, min_start);"
   "CREATE TABLE span_keys (tenant TEXT NOT NULL, trace_id BLOB NOT NULL, span_id BLOB NOT NULL, block INTEGER NOT NULL, PRIMARY KEY (tenant, trace_id, span_id)) WITHOUT ROWID;",0,0,0);
  sqlite3_stmt*b,*k; sqlite3_prepare_v2(db,"INSERT INTO span_blocks (tenant,min_start,max_start,data) VALUES (?,?,?,?)",-1,&b,0);
  sqlite3_prepare_v2(db,"INSERT INTO span_keys VALUES (?,?,?,?) ON CONFLICT DO NOTHING",-1,&k,0);
  char*blob=malloc(512*120); for(int i=0;i<512*120;i++) blob[i]=rand();  /* ~120 B/span compressed, incompressible stand-in */
  double c0=cpu(),w0=now();
  for(int s=0;s<N;s+=512){ if(s%20480==0) sqlite3_exec(db,"begin",0,0,0);
    sqlite3_bind_text(b,1,"bench",-1,SQLITE_STATIC);sqlite3_bind_int64(b,2,s);sqlite3_bind_int64(b,3,s+511);sqlite3_bind_blob(b,4,blob,512*120,SQLITE_STATIC);sqlite3_step(b);sqlite3_reset(b);
    long id=sqlite3_last_insert_rowid(db);
    for(int i=0;i<512;i++){ unsigned char tid[16],sid[8]; long seed=s/512+1; for(int j=0;j<8;j++){tid[j]=seed>>(56-8*j);tid[8+j]=(i/8)>>(56-8*j);sid[j]=((seed<<20)|i)>>(56-8*j);}
      /* random trace ids as in production */ for(int j=0;j<16;j++) tid[j]=rand();
      sqlite3_bind_text(k,1,"bench",-1,SQLITE_STATIC);sqlite3_bind_blob(k,2,tid,16,SQLITE_STATIC);sqlite3_bind_blob(k,3,sid,8,SQLITE_STATIC);sqlite3_bind_int64(k,4,id);sqlite3_step(k);sqlite3_reset(k);}
    if(s%20480==20480-512) sqlite3_exec(db,"commit",0,0,0);}
  printf("block layout: spans/s wall %.0f, per CPU-second %.0f\n",N/(now()-w0),N/(cpu()-c0));}
