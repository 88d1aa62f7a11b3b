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
//!
//! The same rules go to both address families (`iptables` and `ip6tables`)
//! unless `--ip-family` says one. IPv6 outbound traffic is sent to `[::1]`, so
//! the sidecar's outbound listener must listen there too.

use ipnet::IpNet;
use std::fmt::Write as _;
use std::net::IpAddr;
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

/// A network, `A.B.C.D/N` or `X:X::X/N`, or one address (as the `ip-restriction`
/// filter reads them).
fn cidr(c: &str) -> Result<IpNet, String> {
    let c = c.trim();
    c.parse::<IpNet>()
        .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{c:?} is not a network (A.B.C.D/N or X:X::X/N)"))
}

/// The address families the rules are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IpFamily {
    Ipv4,
    Ipv6,
    /// Both (IPv6 only where the kernel has it).
    Dual,
}

impl IpFamily {
    fn has(self, v6: bool) -> bool {
        match self {
            IpFamily::Ipv4 => !v6,
            IpFamily::Ipv6 => v6,
            IpFamily::Dual => true,
        }
    }
}

/// `iptables` or `ip6tables`.
fn tool(v6: bool) -> &'static str {
    if v6 { "ip6tables" } else { "iptables" }
}

/// Whether the kernel has IPv6 (it may be disabled on the command line).
fn kernel_has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
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
    /// Destination networks the workload reaches directly, comma-separated (IPv4
    /// or IPv6; each goes to its own family's rules).
    #[arg(long, value_delimiter = ',', value_parser = cidr)]
    exclude_outbound_cidrs: Vec<IpNet>,
    /// The address families to intercept: `dual` writes the same rules with
    /// iptables and ip6tables (IPv6 skipped where the kernel has none).
    #[arg(long, value_enum, default_value_t = IpFamily::Dual)]
    ip_family: IpFamily,
    /// Install the rules (replacing meshgate's earlier ones) instead of printing them.
    #[arg(long, conflicts_with = "remove")]
    apply: bool,
    /// Remove meshgate's rules and chains.
    #[arg(long)]
    remove: bool,
}

/// The rules of one family (`v6`), in `iptables-restore --noflush` (or
/// `ip6tables-restore`) input.
pub fn rules(a: &IptablesArgs, v6: bool) -> String {
    let mut r = format!(
        "# meshgate mesh iptables: load with `{}-restore --noflush`\n*nat\n",
        tool(v6)
    );
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
    let same_family = |n: &&IpNet| matches!(n, IpNet::V6(_)) == v6;
    for net in a.exclude_outbound_cidrs.iter().filter(same_family) {
        let _ = writeln!(r, "-A MESHGATE_OUTPUT -d {net} -j RETURN");
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
    if a.ip_family == IpFamily::Ipv6 && !kernel_has_ipv6() {
        eprintln!("meshgate mesh iptables: --ip-family ipv6, but this kernel has no IPv6");
        return ExitCode::from(1);
    }
    // Dual: IPv6 too where the kernel has it.
    let families: Vec<bool> = [false, true]
        .into_iter()
        .filter(|&v6| a.ip_family.has(v6) && (!v6 || kernel_has_ipv6()))
        .collect();
    if a.remove {
        for &v6 in &families {
            remove(v6);
        }
        return ExitCode::SUCCESS;
    }
    if a.proxy_uid.is_none() && a.proxy_gid.is_none() {
        eprintln!(
            "meshgate mesh iptables: give --proxy-uid or --proxy-gid: the proxy's own \
             connections must not be sent back to it"
        );
        return ExitCode::from(2);
    }
    if let Some(net) = a
        .exclude_outbound_cidrs
        .iter()
        .find(|n| !a.ip_family.has(matches!(n, IpNet::V6(_))))
    {
        let family = clap::ValueEnum::to_possible_value(&a.ip_family);
        eprintln!(
            "meshgate mesh iptables: --exclude-outbound-cidrs {net} is not of --ip-family {}",
            family.as_ref().map_or("", |f| f.get_name())
        );
        return ExitCode::from(2);
    }
    if !a.apply {
        // Printed for review: each family's input for its own restore command.
        for (i, &v6) in families.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print!("{}", rules(a, v6));
        }
        return ExitCode::SUCCESS;
    }
    for &v6 in &families {
        remove(v6);
        if let Err(e) = restore(&rules(a, v6), v6) {
            eprintln!("meshgate mesh iptables: {e}");
            return ExitCode::from(1);
        }
    }
    let names: Vec<&str> = families.iter().map(|&v6| tool(v6)).collect();
    eprintln!(
        "meshgate mesh iptables: rules installed ({})",
        names.join(", ")
    );
    ExitCode::SUCCESS
}

fn restore(text: &str, v6: bool) -> Result<(), String> {
    use std::io::Write as _;
    let cmd = format!("{}-restore", tool(v6));
    let mut child = Command::new(&cmd)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd} (is iptables installed?): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("{cmd}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} refused the rules ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Remove meshgate's jumps and chains of one family; what is not there is skipped.
fn remove(v6: bool) {
    let nat = |args: &[&str]| {
        Command::new(tool(v6))
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
            "10.0.0.0/8,169.254.169.254,fd00:ec2::254",
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
        assert_eq!(rules(&a, false), want);
        // IPv6: the same rules for ip6tables, with the IPv6 networks only.
        let v6 = rules(&a, true);
        assert!(
            v6.starts_with("# meshgate mesh iptables: load with `ip6tables-restore --noflush`\n")
        );
        assert_eq!(
            v6.lines()
                .skip(1)
                .filter(|l| !l.contains(" -d "))
                .collect::<Vec<_>>(),
            want.lines()
                .skip(1)
                .filter(|l| !l.contains(" -d "))
                .collect::<Vec<_>>()
        );
        assert!(
            v6.contains("-A MESHGATE_OUTPUT -d fd00:ec2::254/128 -j RETURN\n"),
            "{v6}"
        );
        assert!(!v6.contains("10.0.0.0"), "{v6}");
    }

    #[test]
    fn chosen_inbound_ports_only() {
        let a = parse(&["--proxy-gid", "1337", "--inbound-ports", "8080,9090"])
            .unwrap_or_else(|e| panic!("{e}"));
        let r = rules(&a, false);
        assert!(r.contains("-A MESHGATE_INBOUND -p tcp --dport 8080 -j MESHGATE_IN_REDIRECT\n"));
        assert!(r.contains("-A MESHGATE_INBOUND -p tcp --dport 9090 -j MESHGATE_IN_REDIRECT\n"));
        assert!(!r.contains("-A MESHGATE_INBOUND -p tcp -j"), "{r}");
        assert!(r.contains("--gid-owner 1337"));
        let none =
            parse(&["--proxy-uid", "1", "--inbound-ports", ""]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!rules(&none, false).contains("-A MESHGATE_INBOUND"));
    }

    #[test]
    fn bad_ports_and_networks_are_usage_errors() {
        for bad in [
            &["--inbound-ports", "80,http"][..],
            &["--exclude-outbound-ports", "0"],
            &["--exclude-outbound-cidrs", "10.0.0.0/33"],
            &["--exclude-outbound-cidrs", "fe80::/129"],
            &["--exclude-outbound-cidrs", "10.0.0.0/"],
            &["--ip-family", "ipx"],
            &["--apply", "--remove"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
