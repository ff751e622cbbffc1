/* The floor of SQLite itself for billing's usage records in a compact row (BENCHMARKS.md,
 * Billing): the same records as usage.c, HISTORY of them (second argument) and then 100,000 new
 * ones, each set in key order (tenant by tenant), 20,000 a transaction, WAL +
 * synchronous=FULL, 64 MiB cache; it prints the CPU per record of both sets. The table
 * definition is the first argument. By default the row is compact: trace and span ids as
 * 16- and 8-byte blobs, kind, period, billed period and plan as small integers; with a third
 * argument (any) they are bound as billing_0001's text (hex ids, "invocation", "2026-11", the
 * plan's name), for comparison in the same program:
 *   cc -O2 usage-compact.c -o usage-compact -lsqlite3
 *   ./usage-compact "CREATE TABLE usage_records (... trace_id BLOB ..., PRIMARY KEY (tenant, usage_id)) WITHOUT ROWID" 2000000
 *   ./usage-compact "CREATE TABLE usage_records (... billing_0001's columns ...) WITHOUT ROWID" 2000000 text
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/resource.h>
static double cpu(){struct rusage u;getrusage(RUSAGE_SELF,&u);return u.ru_utime.tv_sec+u.ru_stime.tv_sec+(u.ru_utime.tv_usec+u.ru_stime.tv_usec)/1e6;}
sqlite3*db; sqlite3_stmt*st; int text=0;
static void ins(long from,long to,const char*pfx,int sorted){
  char tenant[8],uid[64],fn[8]; unsigned char tid[16],sid[8];
  sqlite3_exec(db,"begin",0,0,0);
  for(long j=from;j<to;j++){ long n=to-from, k=j-from, i= sorted? from + (k%(n/100))*100 + k/(n/100) : j;
    sprintf(tenant,"t%03ld",i%100);sprintf(uid,"%s-%016lx-7000-8000-%012lx",pfx,i,i);sprintf(fn,"f%ld",(i/100)%10);for(int b=0;b<16;b++)tid[b]=(i>>(b%8))&255;for(int b=0;b<8;b++)sid[b]=(i>>b)&255;
    sqlite3_bind_text(st,1,tenant,-1,SQLITE_STATIC);sqlite3_bind_text(st,2,uid,-1,SQLITE_STATIC);if(text)sqlite3_bind_text(st,3,"invocation",-1,SQLITE_STATIC);else sqlite3_bind_int(st,3,1);
    sqlite3_bind_text(st,4,fn,-1,SQLITE_STATIC);sqlite3_bind_null(st,5);if(text){char th[33],sh[17];sprintf(th,"%032lx",i);sprintf(sh,"%016lx",i);sqlite3_bind_text(st,6,th,-1,SQLITE_TRANSIENT);sqlite3_bind_text(st,7,sh,-1,SQLITE_TRANSIENT);}else{sqlite3_bind_blob(st,6,tid,16,SQLITE_STATIC);sqlite3_bind_blob(st,7,sid,8,SQLITE_STATIC);}
    sqlite3_bind_int64(st,8,i);sqlite3_bind_int64(st,9,i+5);for(int c=10;c<=15;c++)sqlite3_bind_int64(st,c,i%97);
    sqlite3_bind_text(st,16,"0",-1,SQLITE_STATIC);if(text){sqlite3_bind_text(st,17,"2026-11",-1,SQLITE_STATIC);sqlite3_bind_text(st,18,"2026-11",-1,SQLITE_STATIC);sqlite3_bind_text(st,19,"free",-1,SQLITE_STATIC);}else{sqlite3_bind_int(st,17,202611);sqlite3_bind_int(st,18,202611);sqlite3_bind_int(st,19,1);}sqlite3_bind_int64(st,20,0);
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
  long hist=atol(argv[2]); text=argc>3;
  double c1=cpu(); ins(0,hist,"inv",1); printf("history %.2f us/record cpu; ",(cpu()-c1)/hist*1e6);
  double c0=cpu(); ins(hist,hist+100000,"new",1);
  printf("new %.2f us/record cpu\n",(cpu()-c0)/1e5*1e6);
}
