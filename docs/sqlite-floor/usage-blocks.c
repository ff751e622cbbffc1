/* Billing's usage records stored in blocks (BENCHMARKS.md, Billing): one row per 512 records of a
 * tenant (a 100-byte-a-record stand-in for their encoding) plus one key row per record (tenant,
 * usage id -> block) for de-duplication; HISTORY records first (first argument), then 100,000
 * new ones, tenant by tenant in key order, 20,000 a transaction, WAL + synchronous=FULL, 64 MiB
 * cache. The same conditions as usage.c, for comparison with one row per record:
 *   cc -O2 usage-blocks.c -o usage-blocks -lsqlite3 && ./usage-blocks 1000000
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/resource.h>
static double cpu(){struct rusage u;getrusage(RUSAGE_SELF,&u);return u.ru_utime.tv_sec+u.ru_stime.tv_sec+(u.ru_utime.tv_usec+u.ru_stime.tv_usec)/1e6;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
sqlite3*db; sqlite3_stmt*b,*k; char blob[512*100];
/* Records [from, to): n/100 per tenant, tenant by tenant; a block per 512 of a tenant. */
static void ins(long from,long to,const char*pfx){
  long n=to-from, per=n/100; char tenant[8],uid[64]; long block=0; int in_block=512;
  sqlite3_exec(db,"begin",0,0,0);
  for(long j=0;j<n;j++){ long t=j/per, i=from+(j%per)*100+t;
    sprintf(tenant,"t%03ld",t);
    if(in_block==512||j%per==0){ sqlite3_bind_text(b,1,tenant,-1,SQLITE_STATIC);sqlite3_bind_text(b,2,"2026-11",-1,SQLITE_STATIC);
      sqlite3_bind_blob(b,3,blob,sizeof blob,SQLITE_STATIC);sqlite3_step(b);sqlite3_reset(b);block=sqlite3_last_insert_rowid(db);in_block=0;}
    sprintf(uid,"%s-%016lx-7000-8000-%012lx",pfx,i,i);
    sqlite3_bind_text(k,1,tenant,-1,SQLITE_STATIC);sqlite3_bind_text(k,2,uid,-1,SQLITE_STATIC);sqlite3_bind_int64(k,3,block);
    if(sqlite3_step(k)!=SQLITE_DONE){printf("%s\n",sqlite3_errmsg(db));exit(1);} sqlite3_reset(k); in_block++;
    if(j%20000==19999){sqlite3_exec(db,"commit",0,0,0);sqlite3_exec(db,"begin",0,0,0);}
  }
  sqlite3_exec(db,"commit",0,0,0);
}
int main(int argc,char**argv){
  remove("ub.db");remove("ub.db-wal");remove("ub.db-shm");
  sqlite3_open("ub.db",&db);
  for(unsigned i=0;i<sizeof blob;i++) blob[i]=rand();
  sqlite3_exec(db,"pragma journal_mode=wal;pragma synchronous=full;pragma cache_size=-65536;"
    "CREATE TABLE usage_blocks (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, billed_period TEXT NOT NULL, data BLOB NOT NULL);"
    "CREATE TABLE usage_keys (tenant TEXT NOT NULL, usage_id TEXT NOT NULL, block INTEGER NOT NULL, PRIMARY KEY (tenant, usage_id)) WITHOUT ROWID;",0,0,0);
  sqlite3_prepare_v2(db,"INSERT INTO usage_blocks (tenant, billed_period, data) VALUES (?,?,?)",-1,&b,0);
  sqlite3_prepare_v2(db,"INSERT INTO usage_keys VALUES (?,?,?) ON CONFLICT DO NOTHING",-1,&k,0);
  ins(0,atol(argv[1]),"inv");
  double c0=cpu(),w0=now(); ins(atol(argv[1]),atol(argv[1])+100000,"new");
  printf("%.2f us/record wall, %.2f cpu\n",(now()-w0)/1e5*1e6,(cpu()-c0)/1e5*1e6);
}
