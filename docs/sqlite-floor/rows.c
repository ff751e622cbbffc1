/* The floor of SQLite itself for the collector's span row (BENCHMARKS.md, Collector ingest):
 * 204,800 rows through one prepared statement, SQLITE_STATIC binds, 20,480 rows a transaction,
 * WAL + synchronous=FULL, 64 MiB cache. The schema is the first argument:
 *   cc -O2 rows.c -o rows -lsqlite3
 *   ./rows "$(cat ../../migrations/sqlite/collector_0001_telemetry.sql)"
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
static double cpu(){struct rusage u;getrusage(RUSAGE_SELF,&u);return u.ru_utime.tv_sec+u.ru_stime.tv_sec+(u.ru_utime.tv_usec+u.ru_stime.tv_usec)/1e6;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){
  const char* schema=argv[1]; int N=204800;
  remove("f.db");remove("f.db-wal");remove("f.db-shm");
  sqlite3*db; sqlite3_open("f.db",&db);
  sqlite3_exec(db,"pragma journal_mode=wal;pragma synchronous=full;pragma cache_size=-65536;",0,0,0);
  char*err=0; if(sqlite3_exec(db,schema,0,0,&err)){printf("%s\n",err);return 1;}
  const char*attrs="{\"http.request.method\":\"GET\",\"http.route\":\"/api/orders/{id}\",\"http.response.status_code\":200,\"url.path\":\"/api/orders/12345\",\"server.address\":\"shop.example.internal\",\"client.address\":\"10.0.1.2\",\"user_agent.original\":\"Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0\",\"db.system\":\"postgresql\",\"db.statement\":\"SELECT * FROM orders WHERE id = $1\",\"enduser.id\":42}";
  const char*res="{\"service.name\":\"shop-api\",\"service.version\":\"1.4.2\",\"host.name\":\"node-7\"}";
  sqlite3_stmt*st; if(sqlite3_prepare_v2(db,"INSERT INTO spans (tenant, trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, status_code, status_message, service_name, attributes, events, links, resource, scope, metered, received_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",-1,&st,0)){printf("%s\n",sqlite3_errmsg(db));return 1;}
  double c0=cpu(),w0=now();
  char tid[33],sid[17],pid[17];
  for(int k=0;k<N;k+=20480){
    sqlite3_exec(db,"begin",0,0,0);
    for(int r=k;r<k+20480;r++){long seed=r/512+1,i=r%512;
      sprintf(tid,"%016lx%016lx",seed,i/8);sprintf(sid,"%016lx",seed<<20|i);sprintf(pid,"%016lx",seed<<20|(i-i%8));
      sqlite3_bind_text(st,1,"bench",-1,SQLITE_STATIC);sqlite3_bind_text(st,2,tid,32,SQLITE_STATIC);sqlite3_bind_text(st,3,sid,16,SQLITE_STATIC);
      if(i%8) sqlite3_bind_text(st,4,pid,16,SQLITE_STATIC); else sqlite3_bind_null(st,4);
      sqlite3_bind_text(st,5,"SELECT orders",-1,SQLITE_STATIC);sqlite3_bind_int(st,6,3);sqlite3_bind_int64(st,7,1764000000000000000L+r*1000L);sqlite3_bind_int64(st,8,1764000000000000000L+r*1000L+250000);
      sqlite3_bind_int(st,9,1);sqlite3_bind_text(st,10,"",0,SQLITE_STATIC);sqlite3_bind_text(st,11,"shop-api",-1,SQLITE_STATIC);sqlite3_bind_text(st,12,attrs,-1,SQLITE_STATIC);
      sqlite3_bind_text(st,13,"[]",-1,SQLITE_STATIC);sqlite3_bind_text(st,14,"[]",-1,SQLITE_STATIC);sqlite3_bind_text(st,15,res,-1,SQLITE_STATIC);sqlite3_bind_text(st,16,"{}",-1,SQLITE_STATIC);
      sqlite3_bind_int(st,17,0);sqlite3_bind_int(st,18,1);
      if(sqlite3_step(st)!=SQLITE_DONE){printf("step %s\n",sqlite3_errmsg(db));return 1;} sqlite3_reset(st);}
    sqlite3_exec(db,"commit",0,0,0);}
  printf("rows/s wall %.0f cpu %.0f\n",N/(now()-w0),N/(cpu()-c0));
}
