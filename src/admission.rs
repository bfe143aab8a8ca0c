//! Places under the connection limits (`--max-connections`, `--max-connections-per-ip`): taken
//! at the handshake, before a connection exists, and given back when it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// How many connections hold a place, in all and by address.
#[derive(Debug, Default)]
pub(crate) struct Admissions {
    admitted: Arc<Mutex<Admitted>>,
}

#[derive(Debug, Default)]
struct Admitted {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One connection's place, given back when dropped.
#[derive(Debug)]
pub(crate) struct Admission {
    admitted: Weak<Mutex<Admitted>>,
    ip: Option<IpAddr>,
}

/// Which limit a handshake was refused at, and the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdmissionLimit {
    Total(usize),
    PerIp(usize),
}

impl Admissions {
    /// Takes a place for a new connection from `ip`, unless a limit (0: none) is reached.
    pub(crate) fn admit(
        &self,
        ip: Option<IpAddr>,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<Admission, AdmissionLimit> {
        let mut admitted = self.admitted.lock();
        if max_total > 0 && admitted.total >= max_total {
            return Err(AdmissionLimit::Total(max_total));
        }
        if let Some(ip) = ip {
            let n = admitted.per_ip.entry(ip).or_default();
            if max_per_ip > 0 && *n >= max_per_ip {
                return Err(AdmissionLimit::PerIp(max_per_ip));
            }
            *n += 1;
        }
        admitted.total += 1;
        Ok(Admission {
            admitted: Arc::downgrade(&self.admitted),
            ip,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some(admitted) = self.admitted.upgrade() else {
            return;
        };
        let mut admitted = admitted.lock();
        admitted.total -= 1;
        if let Some(ip) = self.ip
            && let Some(n) = admitted.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                admitted.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_limited_in_all_and_per_address_and_given_back() {
        let admissions = Admissions::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = admissions.admit(Some(a), 3, 2).unwrap();
        let _second = admissions.admit(Some(a), 3, 2).unwrap();
        assert_eq!(
            admissions.admit(Some(a), 3, 2).unwrap_err(),
            AdmissionLimit::PerIp(2)
        );
        let _third = admissions.admit(Some(b), 3, 2).unwrap();
        assert_eq!(
            admissions.admit(Some(b), 3, 2).unwrap_err(),
            AdmissionLimit::Total(3)
        );
        drop(first);
        admissions.admit(Some(a), 3, 2).unwrap();
        assert!(admissions.admit(None, 0, 0).is_ok(), "0 is no limit");
    }
}
