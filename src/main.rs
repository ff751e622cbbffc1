//! `sfaas`: the command line of stateful-faas. It wires the crates together; nothing else.

mod args;
#[cfg(feature = "bench")]
mod bench;
mod client;
mod demo;
mod etl;
mod servers;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use args::{CollectorCommandArgs, CoreCommandArgs, DashboardCommandArgs, UpArgs};

#[derive(Parser)]
#[command(name = "sfaas", version, about = "stateful serverless platform with built-in observability and billing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once, at start: the size of the server commands' flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run every component in one process (the main job).
    Up(UpArgs),
    /// Run only the core: the gateway, functions, flows, state and the async queue.
    Core(CoreCommandArgs),
    /// Run only the collector (it checks tokens against the core's database in DATA_DIR).
    Collector(CollectorCommandArgs),
    /// Run only the dashboard: the billing API (and billing runs), over the telemetry store.
    Dashboard(DashboardCommandArgs),
    /// Manage tenants (admin).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Deploy the functions of a stack file.
    Deploy {
        #[arg(short = 'f', long = "file", default_value = "stack.yml")]
        file: PathBuf,
        /// Namespace for functions that name none (default: the token's tenant).
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Invoke a function; the request body is read from --data or stdin.
    Invoke {
        name: String,
        #[arg(long)]
        namespace: Option<String>,
        /// Queue the call durably and return its call id at once.
        #[arg(long = "async")]
        is_async: bool,
        #[arg(long)]
        callback_url: Option<String>,
        /// Request body (default: stdin).
        #[arg(short = 'd', long)]
        data: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Show a function's logs (each line its stderr gets), oldest first; --follow keeps
    /// printing them as they come.
    Logs {
        name: String,
        #[arg(long)]
        namespace: Option<String>,
        /// Lines since this long ago (`10m`, `2h`, `1d`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u64>,
        /// One invocation's lines: its invocation id, or the X-Call-Id it was called with.
        #[arg(long)]
        invocation: Option<String>,
        /// Keep printing lines as they arrive.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// List functions.
    List {
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Remove a function.
    Remove {
        name: String,
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Deploy, run and inspect flows (DAGs of functions).
    #[command(subcommand)]
    Flow(FlowCommand),
    /// Billing: run it, show and finalize invoices (admin).
    #[command(subcommand)]
    Bill(BillCommand),
    /// Rate cards and tenants' plans (admin).
    #[command(subcommand)]
    Plan(PlanCommand),
    /// The streaming ETL example (examples/etl/): set it up, generate and stream records.
    #[command(subcommand)]
    Etl(EtlCommand),
    /// Benchmarks (figures go to BENCHMARKS.md; built with the `bench` feature, on by default).
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Subcommand)]
enum EtlCommand {
    /// Deploy the ETL functions, the `etl` flow and the zone lookup table into a namespace.
    Setup {
        #[arg(long)]
        namespace: String,
        /// How stages hand data on: state (the state store), inline, or s3 (the bucket the
        /// platform was started with, --etl-s3-url).
        #[arg(long, default_value = "state", value_parser = ["state", "inline", "s3"])]
        transport: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Print generated trip records: JSON lines, or CSV with --csv.
    Generate {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        records: usize,
        #[arg(long)]
        csv: bool,
        /// Bad records per thousand (malformed, missing fare, negative distance, unknown zone, no passengers).
        #[arg(long, default_value_t = 50)]
        bad_per_mille: u32,
        /// Time of the first trip, ms since the epoch (default: now).
        #[arg(long)]
        start_ms: Option<i64>,
    },
    /// Stream generated records into a namespace's etl flow (POST /stream/etl.NAMESPACE).
    Stream {
        #[arg(long)]
        namespace: String,
        #[arg(long, default_value_t = 10_000)]
        records: usize,
        /// Records per second (0: as fast as the pipeline accepts them).
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 50)]
        bad_per_mille: u32,
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum BillCommand {
    /// Bill the usage that arrived since the last run; finalize periods whose grace is over.
    Run {
        /// Finalize as of this RFC 3339 time instead of now (not in the future).
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Show a tenant's invoice (default: the current period).
    Show {
        #[arg(long)]
        tenant: String,
        /// YYYY-MM (or YYYY-MM-DD with daily periods).
        #[arg(long)]
        period: Option<String>,
        /// json or csv.
        #[arg(long, default_value = "json")]
        format: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// List invoices (of one tenant, or all).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Make a period's invoices (and all earlier ones) final now, before the grace window ends.
    Finalize {
        #[arg(long)]
        period: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Metered invocations against the gateway's own counts, per tenant and function.
    Reconcile {
        #[arg(long)]
        tenant: Option<String>,
        /// YYYY-MM (or YYYY-MM-DD with daily periods); default the current one.
        #[arg(long)]
        period: Option<String>,
        /// First bring both sides up to now (`sfaas up` only): the core's spans sent, its
        /// counters stored, billing run once they are billable (about 5 s). Exactly 0 for every
        /// function when nothing was lost and no call ran meanwhile.
        #[arg(long)]
        settle: bool,
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Replace the rate card (YAML; see examples/billing/plans.yml).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Put a tenant on a plan from a time (default now).
    Assign {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        plan: String,
        /// RFC 3339 time the plan takes effect (now or later).
        #[arg(long)]
        from: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Show the rate card in force.
    Show {
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints {"tenant","ingest_token","read_token"} once.
    Create {
        name: String,
        #[arg(long)]
        plan: Option<String>,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// List tenants.
    List {
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum FlowCommand {
    /// Deploy (create or replace) a flow from a YAML or JSON file.
    Deploy {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Run a flow; prints its output (or, with --async, the run id).
    Run {
        name: String,
        /// Input file (default: stdin; `-` is stdin too).
        #[arg(long)]
        input: Option<PathBuf>,
        #[arg(long = "async")]
        is_async: bool,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Show a run: status, nodes, output.
    Status {
        run_id: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Cancel a running run.
    Cancel {
        run_id: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Draw a flow's DAG.
    Graph {
        name: String,
        /// text or dot.
        #[arg(long, default_value = "text")]
        format: String,
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // No transparent huge pages: mimalloc asks for them on its arenas and returns freed memory
    // to the kernel after 10 ms, so memory that churns (request bodies, state values) came back
    // as fresh 2 MiB pages that the kernel zeroes on each first touch: half the CPU of the
    // state store's HTTP benchmark went there (docs/decisions.md). Redis advises the same.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    // Workers look for new I/O every 7 task polls (tokio's default is 61): under load, a new
    // request is then noticed after a few of the tasks queued before it, not after dozens,
    // which is what keeps one tenant's burst of calls from delaying another's.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(7)
        .build()
        .expect("a tokio runtime starts");
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SFAAS_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Up(UpArgs { data, core, platform }) => servers::serve(data, core, Some(platform)).await,
        Command::Core(CoreCommandArgs { data, core }) => servers::serve(data, core, None).await,
        Command::Collector(CollectorCommandArgs { data, collector }) => servers::serve_collector(data, collector).await,
        Command::Dashboard(DashboardCommandArgs { data, dashboard }) => servers::serve_dashboard(data, dashboard).await,
        Command::Bill(BillCommand::Run { until, client }) => client::bill_run(&client, until).await,
        Command::Bill(BillCommand::Show { tenant, period, format, client }) => {
            client::bill_show(&client, &tenant, period, &format).await
        }
        Command::Bill(BillCommand::List { tenant, client }) => client::bill_list(&client, tenant).await,
        Command::Bill(BillCommand::Finalize { period, client }) => client::bill_finalize(&client, &period).await,
        Command::Bill(BillCommand::Reconcile { tenant, period, settle, client }) => {
            client::bill_reconcile(&client, tenant, period, settle).await
        }
        Command::Plan(PlanCommand::Apply { file, client }) => client::plan_apply(&client, &file).await,
        Command::Plan(PlanCommand::Assign { tenant, plan, from, client }) => {
            client::plan_assign(&client, &tenant, &plan, from).await
        }
        Command::Plan(PlanCommand::Show { client }) => client::plan_show(&client).await,
        Command::Tenant(TenantCommand::Create { name, plan, client }) => {
            client::tenant_create(&client, &name, plan).await
        }
        Command::Tenant(TenantCommand::List { client }) => client::tenant_list(&client).await,
        Command::Deploy { file, namespace, client } => client::deploy(&client, &file, namespace).await,
        Command::Invoke { name, namespace, is_async, callback_url, data, client } => {
            client::invoke(&client, &name, namespace, is_async, callback_url, data).await
        }
        Command::Logs { name, namespace, since, tail, invocation, follow, client } => {
            client::logs(&client, &name, namespace, since, tail, invocation, follow).await
        }
        Command::List { namespace, client } => client::list(&client, namespace).await,
        Command::Remove { name, namespace, client } => client::remove(&client, &name, namespace).await,
        Command::Flow(FlowCommand::Deploy { file, client }) => client::flow_deploy(&client, &file).await,
        Command::Flow(FlowCommand::Run { name, input, is_async, client }) => {
            client::flow_run(&client, &name, input, is_async).await
        }
        Command::Flow(FlowCommand::Status { run_id, client }) => client::flow_status(&client, &run_id).await,
        Command::Flow(FlowCommand::Cancel { run_id, client }) => client::flow_cancel(&client, &run_id).await,
        Command::Flow(FlowCommand::Graph { name, format, client }) => client::flow_graph(&client, &name, &format).await,
        Command::Etl(EtlCommand::Setup { namespace, transport, client }) => {
            client::etl_setup(&client, &namespace, &transport).await
        }
        Command::Etl(EtlCommand::Generate { seed, records, csv, bad_per_mille, start_ms }) => {
            etl::print_generated(seed, records, bad_per_mille, csv, start_ms);
            Ok(())
        }
        Command::Etl(EtlCommand::Stream { namespace, records, rate, seed, bad_per_mille, client }) => {
            client::etl_stream(&client, &namespace, records, rate, seed, bad_per_mille).await
        }
        #[cfg(feature = "bench")]
        Command::Bench(command) => bench::run(command).await,
    }
}
