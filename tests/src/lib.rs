//! The enforcer's test harness: network namespaces and links (`netns`), the lab topology with
//! real services (`topology`), the real `enforcer` binary run inside it (`daemon`), and crafted
//! frames for `BPF_PROG_TEST_RUN` (`packet`) and the userspace reference of their verdict
//! (`reference`). The demo uses the same pieces.

pub mod capture;
pub mod daemon;
pub mod etcd;
pub mod fleet;
pub mod flood;
pub mod generate;
pub mod kernel;
pub mod netns;
pub mod packet;
pub mod reference;
pub mod rng;
pub mod topology;
pub mod vpn;
pub mod xdp_filter;
