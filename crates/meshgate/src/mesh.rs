//! `meshgate mesh iptables`: the nat rules that send a workload's TCP traffic
//! through its sidecar (transparent interception), printed for review or
//! installed with `iptables-restore`. Run it in the workload's network namespace
//! (a pod's init container, or `ip netns exec`).
//!
//! - Outbound: every TCP connection the workload opens goes to the sidecar's
//!   outbound listener, but the proxy's own (matched by its uid or gid), those
//!   leaving by loopback, and excluded ports and networks. The proxy reads where
//!   each was going with `SO_ORIGINAL_DST`.
//! - Inbound: TCP arriving for the chosen ports goes to the sidecar's inbound
//!   listener, so the app cannot be reached around its sidecar.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, ExitCode, Stdio};

/// Every chain meshgate adds to the nat table, in the order they are removed.
const CHAINS: [&str; 4] = [
    "MESHGATE_INBOUND",
    "MESHGATE_IN_REDIRECT",
    "MESHGATE_OUTPUT",
    "MESHGATE_REDIRECT",
];

/// The rules that send traffic into meshgate's chains: removed first.
const JUMPS: [(&str, &str); 2] = [
    ("PREROUTING", "MESHGATE_INBOUND"),
    ("OUTPUT", "MESHGATE_OUTPUT"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    All,
    Some(Vec<u16>),
}

fn ports(s: &str) -> Result<Ports, String> {
    if s.trim() == "*" {
        return Ok(Ports::All);
    }
    port_list(s).map(Ports::Some)
}

fn port_list(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(port)
        .collect()
}

fn port(p: &str) -> Result<u16, String> {
    match p.trim().parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{p:?} is not a port (1-65535)")),
    }
}

/// An IPv4 network, `A.B.C.D/N` (or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(Ipv4Addr, u8);

fn cidr(c: &str) -> Result<Cidr, String> {
    let c = c.trim();
    let (ip, len) = c.split_once('/').unwrap_or((c, "32"));
    match (ip.parse::<Ipv4Addr>(), len.parse::<u8>()) {
        (Ok(ip), Ok(len)) if len <= 32 => Ok(Cidr(ip, len)),
        _ => Err(format!("{c:?} is not an IPv4 network (A.B.C.D/N)")),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct IptablesArgs {
    /// The user id the proxy runs as: its own connections are not redirected.
    #[arg(long)]
    proxy_uid: Option<u32>,
    /// The group id the proxy runs as (instead of, or with, --proxy-uid).
    #[arg(long)]
    proxy_gid: Option<u32>,
    /// The sidecar's outbound listener port (--outbound of `meshgate proxy`).
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// The sidecar's inbound listener port (--inbound of `meshgate proxy`).
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Inbound TCP ports sent to the inbound listener: a comma-separated list,
    /// `*` for every port, or `""` for none.
    #[arg(long, default_value = "*", value_parser = ports)]
    inbound_ports: Ports,
    /// Inbound ports left alone when --inbound-ports is `*` (ssh, say).
    #[arg(long, value_delimiter = ',', value_parser = port)]
    exclude_inbound_ports: Vec<u16>,
    /// Destination ports the workload reaches directly, comma-separated
    /// (protocols where the server speaks first, say).
    #[arg(long, value_delimiter = ',', value_parser = port)]
    exclude_outbound_ports: Vec<u16>,
    /// Destination networks the workload reaches directly, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = cidr)]
    exclude_outbound_cidrs: Vec<Cidr>,
    /// Install the rules (replacing meshgate's earlier ones) instead of printing them.
    #[arg(long, conflicts_with = "remove")]
    apply: bool,
    /// Remove meshgate's rules and chains.
    #[arg(long)]
    remove: bool,
}

/// The rules, in `iptables-restore --noflush` input.
pub fn rules(a: &IptablesArgs) -> String {
    let mut r =
        String::from("# meshgate mesh iptables: load with `iptables-restore --noflush`\n*nat\n");
    for c in CHAINS {
        let _ = writeln!(r, ":{c} - [0:0]");
    }
    // Inbound.
    let _ = writeln!(
        r,
        "-A MESHGATE_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        a.inbound_port
    );
    match &a.inbound_ports {
        Ports::All => {
            let mut skip = vec![a.inbound_port];
            skip.extend(&a.exclude_inbound_ports);
            for p in skip {
                let _ = writeln!(r, "-A MESHGATE_INBOUND -p tcp --dport {p} -j RETURN");
            }
            r.push_str("-A MESHGATE_INBOUND -p tcp -j MESHGATE_IN_REDIRECT\n");
        }
        Ports::Some(list) => {
            for p in list {
                let _ = writeln!(
                    r,
                    "-A MESHGATE_INBOUND -p tcp --dport {p} -j MESHGATE_IN_REDIRECT"
                );
            }
        }
    }
    // Outbound.
    let _ = writeln!(
        r,
        "-A MESHGATE_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        a.outbound_port
    );
    if let Some(uid) = a.proxy_uid {
        let _ = writeln!(r, "-A MESHGATE_OUTPUT -m owner --uid-owner {uid} -j RETURN");
    }
    if let Some(gid) = a.proxy_gid {
        let _ = writeln!(r, "-A MESHGATE_OUTPUT -m owner --gid-owner {gid} -j RETURN");
    }
    // Loopback: the app calling a local process, the outbound listener by
    // address, or its own address.
    r.push_str("-A MESHGATE_OUTPUT -o lo -j RETURN\n");
    for p in &a.exclude_outbound_ports {
        let _ = writeln!(r, "-A MESHGATE_OUTPUT -p tcp --dport {p} -j RETURN");
    }
    for Cidr(ip, len) in &a.exclude_outbound_cidrs {
        let _ = writeln!(r, "-A MESHGATE_OUTPUT -d {ip}/{len} -j RETURN");
    }
    r.push_str("-A MESHGATE_OUTPUT -j MESHGATE_REDIRECT\n");
    for (from, to) in JUMPS {
        let _ = writeln!(r, "-A {from} -p tcp -j {to}");
    }
    r.push_str("COMMIT\n");
    r
}

/// `meshgate mesh iptables`.
pub fn iptables(a: &IptablesArgs) -> ExitCode {
    if a.remove {
        remove();
        return ExitCode::SUCCESS;
    }
    if a.proxy_uid.is_none() && a.proxy_gid.is_none() {
        eprintln!(
            "meshgate mesh iptables: give --proxy-uid or --proxy-gid: the proxy's own \
             connections must not be sent back to it"
        );
        return ExitCode::from(2);
    }
    let text = rules(a);
    if !a.apply {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    remove();
    match restore(&text) {
        Ok(()) => {
            eprintln!("meshgate mesh iptables: rules installed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshgate mesh iptables: {e}");
            ExitCode::from(1)
        }
    }
}

fn restore(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run iptables-restore (is iptables installed?): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("iptables-restore: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables-restore refused the rules ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Remove meshgate's jumps and chains; what is not there is skipped.
fn remove() {
    let nat = |args: &[&str]| {
        Command::new("iptables")
            .args(["-w", "-t", "nat"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for (from, to) in JUMPS {
        // Once per copy, should the rules have been loaded twice by hand.
        while nat(&["-D", from, "-p", "tcp", "-j", to]) {}
    }
    for c in CHAINS {
        nat(&["-F", c]);
    }
    for c in CHAINS {
        nat(&["-X", c]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: IptablesArgs,
    }

    fn parse(args: &[&str]) -> Result<IptablesArgs, String> {
        Cli::try_parse_from(std::iter::once("iptables").chain(args.iter().copied()))
            .map(|c| c.a)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_rules_redirect_both_ways_and_spare_the_proxy() {
        let a = parse(&[
            "--proxy-uid",
            "1337",
            "--exclude-inbound-ports",
            "22",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,169.254.169.254",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let want = "\
# meshgate mesh iptables: load with `iptables-restore --noflush`
*nat
:MESHGATE_INBOUND - [0:0]
:MESHGATE_IN_REDIRECT - [0:0]
:MESHGATE_OUTPUT - [0:0]
:MESHGATE_REDIRECT - [0:0]
-A MESHGATE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESHGATE_INBOUND -p tcp --dport 15006 -j RETURN
-A MESHGATE_INBOUND -p tcp --dport 22 -j RETURN
-A MESHGATE_INBOUND -p tcp -j MESHGATE_IN_REDIRECT
-A MESHGATE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A MESHGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESHGATE_OUTPUT -o lo -j RETURN
-A MESHGATE_OUTPUT -p tcp --dport 5432 -j RETURN
-A MESHGATE_OUTPUT -d 10.0.0.0/8 -j RETURN
-A MESHGATE_OUTPUT -d 169.254.169.254/32 -j RETURN
-A MESHGATE_OUTPUT -j MESHGATE_REDIRECT
-A PREROUTING -p tcp -j MESHGATE_INBOUND
-A OUTPUT -p tcp -j MESHGATE_OUTPUT
COMMIT
";
        assert_eq!(rules(&a), want);
    }

    #[test]
    fn chosen_inbound_ports_only() {
        let a = parse(&["--proxy-gid", "1337", "--inbound-ports", "8080,9090"])
            .unwrap_or_else(|e| panic!("{e}"));
        let r = rules(&a);
        assert!(r.contains("-A MESHGATE_INBOUND -p tcp --dport 8080 -j MESHGATE_IN_REDIRECT\n"));
        assert!(r.contains("-A MESHGATE_INBOUND -p tcp --dport 9090 -j MESHGATE_IN_REDIRECT\n"));
        assert!(!r.contains("-A MESHGATE_INBOUND -p tcp -j"), "{r}");
        assert!(r.contains("--gid-owner 1337"));
        let none =
            parse(&["--proxy-uid", "1", "--inbound-ports", ""]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!rules(&none).contains("-A MESHGATE_INBOUND"));
    }

    #[test]
    fn bad_ports_and_networks_are_usage_errors() {
        for bad in [
            &["--inbound-ports", "80,http"][..],
            &["--exclude-outbound-ports", "0"],
            &["--exclude-outbound-cidrs", "10.0.0.0/33"],
            &["--exclude-outbound-cidrs", "fe80::/10"],
            &["--apply", "--remove"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
