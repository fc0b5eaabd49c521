//! `interposer-fs SOURCE MOUNTPOINT [-o key=value]...`: serve SOURCE at MOUNTPOINT through the
//! layer stack, in the foreground, until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use interposer_fs::config::{DAEMON_KEYS, DaemonConfig};
use interposer_fs::daemon;
use interposer_fs::params::KEYS;

#[derive(Parser, Debug)]
#[command(
    name = "interposer-fs",
    version,
    about = "Mount a directory through a traced, measured, fault-injecting, throttled FUSE passthrough",
    after_long_help = long_help()
)]
struct Cli {
    /// Directory to serve.
    source: PathBuf,
    /// Where to mount it (an existing directory that is not a mount point).
    mountpoint: PathBuf,
    /// One option, `key=value` or a flag; repeat -o for each (values may contain commas).
    #[arg(short = 'o', value_name = "KEY=VALUE")]
    options: Vec<String>,
}

fn long_help() -> String {
    let mut s = String::from("Volume parameters (the same keys as StorageClass parameters):\n");
    for (k, v) in KEYS {
        s.push_str(&format!("  {k:<30} {v}\n"));
    }
    s.push_str("\nDaemon options:\n");
    for (k, v) in DAEMON_KEYS {
        s.push_str(&format!("  {k:<30} {v}\n"));
    }
    s.push_str(
        "\nOperation names: lookup getattr setattr readlink mknod mkdir unlink rmdir symlink rename\n\
         link open read write flush release fsync opendir readdir releasedir fsyncdir statfs setxattr\n\
         getxattr listxattr removexattr access create fallocate copy_file_range lseek\n\
         \nEnvironment: OTEL_EXPORTER_OTLP_ENDPOINT (default http://localhost:4317), OTEL_SERVICE_NAME,\n\
         RUST_LOG.\n\
         \nExample:\n  interposer-fs /data /mnt/data -o layers=trace,metrics,fault -o fault.ops=write \\\n    \
         -o 'fault.paths=*.log' -o fault.probability=0.1 -o fault.seed=42 -o metrics.address=127.0.0.1:9100\n",
    );
    s
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let config = match DaemonConfig::parse(cli.source, cli.mountpoint, &cli.options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("interposer-fs: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = daemon::block_signals() {
        eprintln!("interposer-fs: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("interposer-fs: {e}");
            ExitCode::FAILURE
        }
    }
}
