//! `lynx web`: serves the browser demo's site folder (written by
//! `web/build.sh`) on 127.0.0.1, with `lynx_cli::static_site`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct WebArgs {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The site folder [default: target/web-site in the repository].
    #[arg(long, value_name = "DIR")]
    pub site: Option<PathBuf>,
}

/// Where `web/build.sh` puts the site.
fn default_site() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web-site")
}

pub fn web_cmd(args: &WebArgs) -> anyhow::Result<()> {
    let site = args.site.clone().unwrap_or_else(default_site);
    let listener = lynx_cli::static_site::bind(args.port).context("starting the web server")?;
    let addr = listener.local_addr().context("reading the server's address")?;
    // The first line is the address, so scripts can wait for it.
    println!("http://{addr}/");
    eprintln!("serving {} (Ctrl-C to stop)", site.display());
    lynx_cli::static_site::serve(listener, &site).context("serving the site")?;
    Ok(())
}
