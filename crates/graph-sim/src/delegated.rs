//! Delegated sign-in as Microsoft Entra ID serves it (issue 26): the device code flow and
//! refresh tokens.
//!
//! Sources: Microsoft Learn, "OAuth 2.0 device authorization grant" (the `/devicecode` answer;
//! polling errors `authorization_pending`, `authorization_declined`, `bad_verification_code`,
//! `expired_token`; codes live 15 minutes) and "Refresh tokens in the Microsoft identity
//! platform" (a new refresh token with every redemption, the old one not revoked by it; 90
//! days of inactivity; revoked by a password change or revoked consent: `invalid_grant`
//! AADSTS700082, 50173, 65001). `slow_down` (RFC 8628 §3.5) is not in Microsoft's list, so it
//! is a switch ([`Delegated::slow_down`]), off by default.

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use std::collections::HashMap;

/// `grant_type` of a device code redemption (RFC 8628).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// How long a device code lives (Microsoft Learn: 15 minutes).
pub const DEVICE_CODE_LIFETIME_SECS: i64 = 900;
/// How often a client may poll, in seconds.
pub const POLL_INTERVAL_SECS: i64 = 5;
/// How long a refresh token lives without use (Microsoft Learn: 90 days).
pub const REFRESH_IDLE_DAYS: i64 = 90;

/// Why a user's refresh tokens stopped working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The user changed their password (AADSTS50173).
    PasswordChanged,
    /// An admin or the user revoked the app's consent (AADSTS65001).
    ConsentRevoked,
}

#[derive(Debug)]
struct DeviceCode {
    device_code: String,
    user_code: String,
    client_id: String,
    scope: String,
    expires: DateTime<Utc>,
    last_poll: Option<DateTime<Utc>>,
    approved: Option<usize>,
    declined: bool,
}

#[derive(Debug)]
struct Refresh {
    user: usize,
    /// Revoked by a password change or revoked consent: redeeming it says why.
    revoked: Option<Revocation>,
    client_id: String,
    scope: String,
    last_used: DateTime<Utc>,
}

/// A refused delegated grant: HTTP status, OAuth error, AADSTS code, description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRefused {
    /// The HTTP status (400 for all of these).
    pub status: u16,
    /// The OAuth error.
    pub error: &'static str,
    /// The AADSTS number.
    pub code: u32,
    /// The description after `AADSTS{code}: `.
    pub description: String,
}

fn refused(error: &'static str, code: u32, description: impl Into<String>) -> GrantRefused {
    GrantRefused {
        status: 400,
        error,
        code,
        description: description.into(),
    }
}

/// What a redeemed grant stands for: the user and the scope granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user (index in the tenant).
    pub user: usize,
    /// The scope, as asked.
    pub scope: String,
}

/// The device codes handed out and the refresh tokens issued.
#[derive(Debug, Default)]
pub struct Delegated {
    codes: Vec<DeviceCode>,
    refresh: HashMap<String, Refresh>,
    /// Answer `slow_down` to a poll sooner than the interval (RFC 8628; off: Entra lists
    /// no such error).
    pub slow_down: bool,
    /// Refresh tokens issued so far.
    pub refresh_issued: u64,
    /// Refresh tokens redeemed so far.
    pub refresh_redeemed: u64,
    /// Every refresh token issued, newest last (the last 4096), for tests that look for
    /// them where they must not be.
    issued: std::collections::VecDeque<String>,
}

fn random(rng: &mut StdRng, alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}

impl Delegated {
    /// `POST /{tenant}/oauth2/v2.0/devicecode`: a device code for `client_id` and `scope`.
    pub fn start(
        &mut self,
        client_id: &str,
        scope: &str,
        now: DateTime<Utc>,
        rng: &mut StdRng,
    ) -> Value {
        self.codes.retain(|c| c.expires > now);
        let user_code = random(rng, b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789", 9);
        let device_code = random(
            rng,
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
            64,
        );
        self.codes.push(DeviceCode {
            device_code: device_code.clone(),
            user_code: user_code.clone(),
            client_id: client_id.into(),
            scope: scope.into(),
            expires: now + Duration::seconds(DEVICE_CODE_LIFETIME_SECS),
            last_poll: None,
            approved: None,
            declined: false,
        });
        json!({
            "user_code": user_code,
            "device_code": device_code,
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": DEVICE_CODE_LIFETIME_SECS,
            "interval": POLL_INTERVAL_SECS,
            "message": format!("To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code {user_code} to authenticate."),
        })
    }

    /// The user `user` enters `user_code` and consents (what a browser would do); `false`
    /// if no such code is pending.
    pub fn approve(&mut self, user_code: &str, user: usize) -> bool {
        match self.codes.iter_mut().find(|c| c.user_code == user_code) {
            Some(c) => {
                c.approved = Some(user);
                true
            }
            None => false,
        }
    }

    /// The user declines the sign-in.
    pub fn decline(&mut self, user_code: &str) -> bool {
        match self.codes.iter_mut().find(|c| c.user_code == user_code) {
            Some(c) => {
                c.declined = true;
                true
            }
            None => false,
        }
    }

    /// A token request with `grant_type=urn:ietf:params:oauth:grant-type:device_code`.
    pub fn poll(
        &mut self,
        client_id: &str,
        device_code: &str,
        now: DateTime<Utc>,
    ) -> Result<Grant, GrantRefused> {
        let slow_down = self.slow_down;
        let Some(i) = self
            .codes
            .iter()
            .position(|c| c.device_code == device_code && c.client_id == client_id)
        else {
            return Err(refused(
                "bad_verification_code",
                70019,
                "The device code is not known (it was redeemed already, or never issued).",
            ));
        };
        let c = &mut self.codes[i];
        if c.expires <= now {
            self.codes.remove(i);
            return Err(refused(
                "expired_token",
                70020,
                "The provided value for the input parameter 'device_code' is not valid. This device code has expired.",
            ));
        }
        if c.declined {
            self.codes.remove(i);
            return Err(refused(
                "authorization_declined",
                70000,
                "The end user denied the authorization request.",
            ));
        }
        let Some(user) = c.approved else {
            let too_soon = c
                .last_poll
                .is_some_and(|p| now - p < Duration::seconds(POLL_INTERVAL_SECS));
            c.last_poll = Some(now);
            if slow_down && too_soon {
                return Err(refused(
                    "slow_down",
                    70016,
                    "OAuth 2.0 device flow error. Polling too often: add the interval to the wait.",
                ));
            }
            return Err(refused(
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            ));
        };
        let scope = c.scope.clone();
        self.codes.remove(i);
        Ok(Grant { user, scope })
    }

    /// A new refresh token for `user` and `client_id` (when `scope` asks `offline_access`).
    pub fn issue_refresh(
        &mut self,
        user: usize,
        client_id: &str,
        scope: &str,
        now: DateTime<Utc>,
        rng: &mut StdRng,
    ) -> Option<String> {
        if !scope.split_whitespace().any(|s| s == "offline_access") {
            return None;
        }
        let token = format!(
            "1.AQ{}",
            random(
                rng,
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                120
            )
        );
        self.refresh.insert(
            token.clone(),
            Refresh {
                user,
                revoked: None,
                client_id: client_id.into(),
                scope: scope.into(),
                last_used: now,
            },
        );
        self.refresh_issued += 1;
        if self.issued.len() >= 4096 {
            self.issued.pop_front();
        }
        self.issued.push_back(token.clone());
        Some(token)
    }

    /// Every refresh token issued (the last 4096), revoked or not.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.issued.iter().cloned().collect()
    }

    /// A token request with `grant_type=refresh_token`: the grant it stands for. The token
    /// stays valid (Entra does not revoke a refresh token when it issues the next one) until
    /// it has been idle for 90 days or its user's tokens are revoked.
    pub fn redeem(
        &mut self,
        client_id: &str,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<Grant, GrantRefused> {
        let Some(r) = self
            .refresh
            .get_mut(token)
            .filter(|r| r.client_id == client_id)
        else {
            return Err(refused(
                "invalid_grant",
                9002313,
                "Invalid request. Request is malformed or invalid: the refresh token is not known.",
            ));
        };
        if let Some(why) = r.revoked {
            return Err(match why {
                Revocation::PasswordChanged => refused(
                    "invalid_grant",
                    50173,
                    "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.",
                ),
                Revocation::ConsentRevoked => refused(
                    "invalid_grant",
                    65001,
                    format!(
                        "The user or administrator has not consented to use the application with ID '{client_id}'. Send an interactive authorization request for this user and resource."
                    ),
                ),
            });
        }
        if now - r.last_used > Duration::days(REFRESH_IDLE_DAYS) {
            return Err(refused(
                "invalid_grant",
                700082,
                "The refresh token has expired due to inactivity. The token was issued on a date and was inactive for 90 days.",
            ));
        }
        r.last_used = now;
        self.refresh_redeemed += 1;
        Ok(Grant {
            user: r.user,
            scope: r.scope.clone(),
        })
    }

    /// Revokes every refresh token `user` holds now (a password change, revoked consent):
    /// each answers `invalid_grant` with the reason's AADSTS code from then on (AADSTS50173,
    /// 65001: Microsoft Learn, "Refresh tokens … Revocation"; the codes in MSAL issue
    /// threads). A new sign-in (device code) issues tokens that work.
    pub fn revoke(&mut self, user: usize, why: Revocation) {
        for r in self.refresh.values_mut().filter(|r| r.user == user) {
            r.revoked = Some(why);
        }
    }
}

impl Delegated {
    /// A token request of `grant_type` (the device code grant or `refresh_token`) from
    /// `client_id`: the grant it redeems.
    pub fn redeem_grant(
        &mut self,
        grant_type: &str,
        client_id: &str,
        form: &HashMap<String, String>,
        now: DateTime<Utc>,
    ) -> Result<Grant, GrantRefused> {
        let field = |k: &str| form.get(k).map_or("", String::as_str).to_owned();
        if grant_type == DEVICE_CODE_GRANT {
            self.poll(client_id, &field("device_code"), now)
        } else {
            self.redeem(client_id, &field("refresh_token"), now)
        }
    }
}

/// The token endpoint's answer to a redeemed grant: the delegated access token and, with
/// `offline_access`, the next refresh token.
pub fn answer(grant: &Grant, access_token: String, refresh: Option<String>, secs: i64) -> Value {
    let mut answer = json!({"token_type": "Bearer", "scope": grant.scope, "expires_in": secs,
                            "ext_expires_in": secs, "access_token": access_token});
    if let Some(r) = refresh {
        answer["refresh_token"] = json!(r);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn code(v: &Value, k: &str) -> String {
        v[k].as_str().unwrap().to_owned()
    }

    /// Microsoft Learn, device authorization grant: pending until the user approves, then
    /// redeemed once; a code unused for 15 minutes expires; a declined one is refused.
    #[test]
    fn a_device_code_is_pending_until_approved_and_redeemed_once() {
        let mut d = Delegated::default();
        let mut rng = StdRng::seed_from_u64(1);
        let now = Utc::now();
        let started = d.start("app", "offline_access Calendars.Read", now, &mut rng);
        assert_eq!(started["interval"], 5);
        assert_eq!(started["expires_in"], 900);
        let (device, user_code) = (code(&started, "device_code"), code(&started, "user_code"));
        assert!(code(&started, "message").contains(&user_code));
        assert_eq!(
            d.poll("app", &device, now).unwrap_err().error,
            "authorization_pending"
        );
        assert_eq!(
            d.poll("other-app", &device, now).unwrap_err().error,
            "bad_verification_code"
        );
        assert!(d.approve(&user_code, 3));
        let grant = d.poll("app", &device, now).unwrap();
        assert_eq!(grant.user, 3);
        assert_eq!(
            d.poll("app", &device, now).unwrap_err().error,
            "bad_verification_code"
        );

        let late = d.start("app", "Calendars.Read", now, &mut rng);
        let refused = d
            .poll(
                "app",
                &code(&late, "device_code"),
                now + Duration::minutes(16),
            )
            .unwrap_err();
        assert_eq!((refused.error, refused.code), ("expired_token", 70020));
        let no = d.start("app", "Calendars.Read", now, &mut rng);
        assert!(d.decline(&code(&no, "user_code")));
        assert_eq!(
            d.poll("app", &code(&no, "device_code"), now)
                .unwrap_err()
                .error,
            "authorization_declined"
        );
        d.slow_down = true;
        let fast = d.start("app", "Calendars.Read", now, &mut rng);
        let dc = code(&fast, "device_code");
        assert_eq!(
            d.poll("app", &dc, now).unwrap_err().error,
            "authorization_pending"
        );
        assert_eq!(
            d.poll("app", &dc, now + Duration::seconds(1))
                .unwrap_err()
                .error,
            "slow_down"
        );
        assert_eq!(
            d.poll("app", &dc, now + Duration::seconds(7))
                .unwrap_err()
                .error,
            "authorization_pending"
        );
    }

    /// Microsoft Learn, refresh tokens: each redemption may issue a new one and the old one
    /// keeps working; 90 idle days expire it (700082); a password change (50173) or revoked
    /// consent (65001) revokes them all until the user signs in again.
    #[test]
    fn refresh_tokens_rotate_expire_when_idle_and_are_revoked() {
        let mut d = Delegated::default();
        let mut rng = StdRng::seed_from_u64(2);
        let now = Utc::now();
        assert_eq!(
            d.issue_refresh(1, "app", "Calendars.Read", now, &mut rng),
            None,
            "offline_access is needed"
        );
        let first = d
            .issue_refresh(1, "app", "offline_access Calendars.Read", now, &mut rng)
            .unwrap();
        assert_eq!(d.redeem("app", &first, now).unwrap().user, 1);
        let second = d
            .issue_refresh(1, "app", "offline_access Calendars.Read", now, &mut rng)
            .unwrap();
        assert_ne!(first, second);
        assert!(
            d.redeem("app", &first, now).is_ok(),
            "the old one still works"
        );
        assert!(d.redeem("app", &second, now).is_ok());
        let idle = d
            .redeem("app", &second, now + Duration::days(91))
            .unwrap_err();
        assert_eq!((idle.error, idle.code), ("invalid_grant", 700082));
        let third = d
            .issue_refresh(1, "app", "offline_access Calendars.Read", now, &mut rng)
            .unwrap();
        let others = d
            .issue_refresh(2, "app", "offline_access Calendars.Read", now, &mut rng)
            .unwrap();
        d.revoke(1, Revocation::PasswordChanged);
        // The token the client holds says why (not "unknown token"): that is what tells it
        // the user must sign in again.
        assert_eq!(d.redeem("app", &third, now).unwrap_err().code, 50173);
        assert_eq!(d.redeem("app", &first, now).unwrap_err().code, 50173);
        assert!(d.redeem("app", &others, now).is_ok(), "another user's");
        let after = d
            .issue_refresh(1, "app", "offline_access Calendars.Read", now, &mut rng)
            .unwrap();
        assert!(d.redeem("app", &after, now).is_ok(), "signed in again");
        d.revoke(1, Revocation::ConsentRevoked);
        assert_eq!(d.redeem("app", &after, now).unwrap_err().code, 65001);
    }
}
