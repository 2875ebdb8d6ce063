//! `enforcer fleet init-roles`: etcd's users and roles that say who may change what. The board
//! writes its own prefix (settings, VPN approvals, deny ranges and feeds, entries of no
//! ministry); each ministry writes only its own prefix; each agent writes only its own status
//! key; all of them read the registry and the status. etcd enforces it: a ministry's write of
//! a VPN approval is refused by etcd, whatever client it uses.
//!
//! Users have no password: with client-certificate authentication (`--client-cert-auth`) etcd
//! takes the user from the certificate's common name, so a user's name is the CN its
//! certificate must carry.

use etcd_client::{Client, Permission, UserAddOptions};

use super::{FleetError, layout};

/// The board's role and user.
pub const BOARD: &str = "enforcer-board";

/// A ministry's role and user.
pub fn ministry(name: &str) -> String {
    format!("enforcer-ministry-{}", layout::encode_segment(name))
}

/// An agent's role and user.
pub fn agent(host: &str) -> String {
    format!("enforcer-agent-{}", layout::encode_segment(host))
}

/// Read access to the registry and to every agent's status.
fn readers() -> Vec<Permission> {
    [layout::REGISTRY, layout::STATUS, layout::SEEN]
        .into_iter()
        .map(|p| Permission::read(p).with_range_end(layout::range_end(p)))
        .collect()
}

/// Every role with its permissions.
pub fn plan(ministries: &[String], agents: &[String]) -> Vec<(String, Vec<Permission>)> {
    let prefix = |p: &str| Permission::read_write(p).with_range_end(layout::range_end(p));
    let mut roles = vec![(BOARD.to_string(), {
        let mut perms = readers();
        perms.push(prefix(layout::BOARD));
        perms
    })];
    for m in ministries {
        let mut perms = readers();
        perms.push(prefix(&layout::ministry_prefix(m)));
        roles.push((ministry(m), perms));
    }
    for host in agents {
        let mut perms = readers();
        perms.push(Permission::read_write(layout::status_key(host)));
        perms.push(Permission::read_write(layout::seen_key(host)));
        roles.push((agent(host), perms));
    }
    roles
}

fn etcd(what: String) -> impl FnOnce(etcd_client::Error) -> FleetError {
    move |source| FleetError::Etcd { what, source }
}

/// Creates (or completes) the roles and their users, a `root` user if there is none, and turns
/// authentication on. Run as etcd's root (or before authentication is on). Returns what it did.
pub async fn init(
    client: &mut Client,
    ministries: &[String],
    agents: &[String],
) -> Result<Vec<String>, FleetError> {
    let mut done = Vec::new();
    let users = client
        .user_list()
        .await
        .map_err(etcd("list users (as etcd's root user)".into()))?
        .users()
        .to_vec();
    let roles = client
        .role_list()
        .await
        .map_err(etcd("list roles".into()))?
        .roles()
        .to_vec();
    if !users.iter().any(|u| u == "root") {
        client
            .user_add("root", "", Some(UserAddOptions::new().with_no_pwd()))
            .await
            .map_err(etcd("add user root".into()))?;
        client
            .user_grant_role("root", "root")
            .await
            .map_err(etcd("grant role root to root".into()))?;
        done.push("user root (role root)".to_string());
    }
    for (role, perms) in plan(ministries, agents) {
        if !roles.contains(&role) {
            client
                .role_add(role.as_str())
                .await
                .map_err(etcd(format!("add role {role}")))?;
            done.push(format!("role {role}"));
        }
        for perm in perms {
            client
                .role_grant_permission(role.as_str(), perm)
                .await
                .map_err(etcd(format!("grant a permission to {role}")))?;
        }
        if !users.contains(&role) {
            client
                .user_add(role.as_str(), "", Some(UserAddOptions::new().with_no_pwd()))
                .await
                .map_err(etcd(format!("add user {role}")))?;
            done.push(format!("user {role}"));
        }
        client
            .user_grant_role(role.as_str(), role.as_str())
            .await
            .map_err(etcd(format!("grant role {role} to its user")))?;
    }
    client
        .auth_enable()
        .await
        .map_err(etcd("enable authentication".into()))?;
    Ok(done)
}
