/* The floor of SQLite itself for billing's usage records (BENCHMARKS.md, Billing): 100,000 records
 * inserted through one prepared statement after HISTORY records (second argument), 20,000 a
 * transaction, WAL + synchronous=FULL, 64 MiB cache; the table definition is the first argument
 * (billing_0001's usage_records):
 *   cc -O2 usage.c -o usage -lsqlite3 && ./usage "CREATE TABLE usage_records (...) WITHOUT ROWID" 1000000
 * A third argument (any) inserts the 100,000 new records in key order (tenant by tenant), as
 * billing's extraction does since 2026-11-27, instead of round-robin over the 100 tenants.
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/resource.h>
static double cpu(){struct rusage u;getrusage(RUSAGE_SELF,&u);return u.ru_utime.tv_sec+u.ru_stime.tv_sec+(u.ru_utime.tv_usec+u.ru_stime.tv_usec)/1e6;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
sqlite3*db; sqlite3_stmt*st;
static int sorted=0;
static void ins(long from,long to,const char*pfx){
  char tenant[8],uid[64],fn[8],tid[33],sid[17];
  sqlite3_exec(db,"begin",0,0,0);
  for(long j=from;j<to;j++){ long n=to-from, k=j-from, i= sorted? from + (k%(n/100))*100 + k/(n/100) : j;
    sprintf(tenant,"t%03ld",i%100);sprintf(uid,"%s-%016lx-7000-8000-%012lx",pfx,i,i);sprintf(fn,"f%ld",(i/100)%10);sprintf(tid,"%032lx",i);sprintf(sid,"%016lx",i);
    sqlite3_bind_text(st,1,tenant,-1,SQLITE_STATIC);sqlite3_bind_text(st,2,uid,-1,SQLITE_STATIC);sqlite3_bind_text(st,3,"invocation",-1,SQLITE_STATIC);
    sqlite3_bind_text(st,4,fn,-1,SQLITE_STATIC);sqlite3_bind_null(st,5);sqlite3_bind_text(st,6,tid,-1,SQLITE_STATIC);sqlite3_bind_text(st,7,sid,-1,SQLITE_STATIC);
    sqlite3_bind_int64(st,8,i);sqlite3_bind_int64(st,9,i+5);for(int c=10;c<=15;c++)sqlite3_bind_int64(st,c,i%97);
    sqlite3_bind_text(st,16,"0",-1,SQLITE_STATIC);sqlite3_bind_text(st,17,"2026-11",-1,SQLITE_STATIC);sqlite3_bind_text(st,18,"2026-11",-1,SQLITE_STATIC);sqlite3_bind_text(st,19,"free",-1,SQLITE_STATIC);sqlite3_bind_int64(st,20,0);
    if(sqlite3_step(st)!=SQLITE_DONE){printf("%s\n",sqlite3_errmsg(db));exit(1);} sqlite3_reset(st);
    if((i-from)%20000==19999){sqlite3_exec(db,"commit",0,0,0);sqlite3_exec(db,"begin",0,0,0);}
  }
  sqlite3_exec(db,"commit",0,0,0);
}
int main(int argc,char**argv){
  remove("u.db");remove("u.db-wal");remove("u.db-shm");
  sqlite3_open("u.db",&db);
  sqlite3_exec(db,"pragma journal_mode=wal;pragma synchronous=full;pragma cache_size=-65536;",0,0,0);
  char*err=0;if(sqlite3_exec(db,argv[1],0,0,&err)){printf("%s\n",err);return 1;}
  sqlite3_prepare_v2(db,"INSERT INTO usage_records (tenant, usage_id, kind, function, flow_run, trace_id, span_id, start_ns, end_ns, cpu_ms, wall_ms, memory_peak_bytes, bytes_in, bytes_out, status_code, state_byte_seconds, period, billed_period, plan, received_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",-1,&st,0);
  long hist=atol(argv[2]);
  ins(0,hist,"inv");
  if(argc>3)sorted=1; double c0=cpu(),w0=now(); ins(hist,hist+100000,"new");
  printf("%.2f us/record wall, %.2f cpu\n",(now()-w0)/1e5*1e6,(cpu()-c0)/1e5*1e6);
}
