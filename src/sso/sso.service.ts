import { type Db, isUniqueViolation, writeTransaction } from '../../db/database';
import type { UserRow } from '../../db/schema';
import { type AuditContext, recordAudit } from '../audit/audit';
import type { Clock } from '../clock';
import { AppError } from '../http/errors';
import * as users from '../users/users.repository';

/** Who the sign-in proxy says the person is. `subject` falls back to the email when no user header came. */
export interface SsoIdentity {
  email: string;
  subject: string;
  username: string | null;
  groups: string[];
}

export type SsoUser = UserRow;

const denied = (message: string) => new AppError(403, 'SSO_ACCESS_DENIED', message);

/**
 * Turns a signed-in person into a keyward user: by SSO subject first, then by email (case-insensitive,
 * linking the subject on first sign-in), then, with SSO_AUTO_PROVISION, a new user. Domain and group
 * restrictions apply to every sign-in, not only the first.
 */
const auditAs = (identity: SsoIdentity, userId: number, request: { ip: string | null; requestId: string | null }): AuditContext => ({
  actor: { type: 'sso', userId, subject: identity.subject, email: identity.email },
  ...request,
});

export class SsoService {
  constructor(
    private readonly deps: {
      db: Db;
      clock: Clock;
      allowedDomains: readonly string[];
      allowedGroups: readonly string[];
      autoProvision: boolean;
      defaultMaxConcurrentBots: number;
      defaultRateLimit: number;
    },
  ) {}

  /** `request` is where the sign-in came from, for the audit entry of a first sign-in that links or creates a user. */
  async userFor(identity: SsoIdentity, request: { ip: string | null; requestId: string | null }): Promise<SsoUser> {
    const { allowedDomains, allowedGroups } = this.deps;
    const domain = identity.email.split('@').pop()!.toLowerCase();
    if (allowedDomains.length > 0 && !allowedDomains.includes(domain)) {
      throw denied(`Sign-in with ${domain} addresses is not allowed on this server.`);
    }
    if (allowedGroups.length > 0 && !identity.groups.some((g) => allowedGroups.includes(g))) {
      throw denied('You are not in a group that may use this server.');
    }

    const user = await this.find(identity, request);
    if (user.disabled_at !== null) throw new AppError(403, 'USER_DISABLED', 'Your keyward user is disabled.');
    return user;
  }

  private async find(identity: SsoIdentity, request: { ip: string | null; requestId: string | null }, attempt = 1): Promise<SsoUser> {
    const { db, clock } = this.deps;
    const bySubject = await users.findUserBySsoSubject(db, identity.subject);
    if (bySubject) return bySubject;

    const byEmail = await users.findUserByEmail(db, identity.email.toLowerCase());
    if (byEmail && byEmail.deleted_at === null) {
      // Linked to this very identity by another of the person's requests between the two look-ups.
      if (byEmail.sso_subject === identity.subject) return byEmail;
      if (byEmail.sso_subject !== null) {
        // Same email, different identity: never hand one person's keys to another.
        throw denied('Your email belongs to a keyward user linked to another sign-in identity; ask the admin.');
      }
      const now = clock.now().toISOString();
      const linked = await writeTransaction(db, async (trx) => {
        const row = await users.linkSsoSubject(trx, byEmail.id, identity.subject, now);
        if (row) {
          await recordAudit(trx, auditAs(identity, row.id, request), now, {
            action: 'user.sso_linked',
            target: { type: 'user', id: row.id, userId: row.id },
            details: { sso_subject: { old: null, new: identity.subject } },
          });
        }
        return row;
      });
      if (linked) return linked;
      // Linked by someone else meanwhile (this person's other first request, or an admin): look again.
      if (attempt === 1) return this.find(identity, request, 2);
    }

    if (!this.deps.autoProvision) throw denied('There is no keyward user for you yet; ask the admin to create one.');
    const now = clock.now().toISOString();
    try {
      return await writeTransaction(db, async (trx) => {
        const row = await users.insertUser(trx, {
        email: identity.email,
        email_lower: identity.email.toLowerCase(),
        name: identity.username,
        max_concurrent_bots: this.deps.defaultMaxConcurrentBots,
        rate_limit_per_minute: this.deps.defaultRateLimit,
        data: null,
        disabled_at: null,
        deleted_at: null,
        created_at: now,
        updated_at: now,
        sso_subject: identity.subject,
        });
        await recordAudit(trx, auditAs(identity, row.id, request), now, {
          action: 'user.created',
          target: { type: 'user', id: row.id, userId: row.id },
          details: { email: row.email, name: row.name, max_concurrent_bots: row.max_concurrent_bots, rate_limit_per_minute: row.rate_limit_per_minute, sso_subject: row.sso_subject, auto_provisioned: true },
        });
        return row;
      });
    } catch (err) {
      // The same person's first two requests at once: the second finds the user the first created.
      if (isUniqueViolation(err) && attempt === 1) return this.find(identity, request, 2);
      throw err;
    }
  }
}
