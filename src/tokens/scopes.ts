import { AppError, validationError } from '../http/errors';

/** The built-in catalog (product.md); EXTRA_SCOPES adds the self-hoster's own. */
export const BUILT_IN_SCOPES = ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'] as const;

/** A token minted without scopes may run bots and nothing else. */
export const DEFAULT_SCOPES = ['bots:read', 'bots:write'];

export function scopeCatalog(extra: readonly string[]): readonly string[] {
  return Object.freeze([...new Set([...BUILT_IN_SCOPES, ...extra])]);
}

/** Folds duplicates and sorts, so equal scope sets are stored and shown the same way. */
export function normalizeScopes(requested: string[] | undefined, catalog: readonly string[] = BUILT_IN_SCOPES): string[] {
  if (requested === undefined) return [...DEFAULT_SCOPES];
  // An empty list is not "no restriction": refuse it rather than mint a token that can do nothing.
  if (requested.length === 0) throw validationError([{ field: 'scopes', in: 'body', message: 'must name at least one scope' }]);
  const unknown = [...new Set(requested.filter((s) => !catalog.includes(s)))];
  if (unknown.length > 0) {
    throw validationError(
      unknown.map((s) => ({ field: 'scopes', in: 'body' as const, message: `unknown scope "${s}"; valid scopes are ${catalog.join(', ')}` })),
    );
  }
  return [...new Set(requested)].sort();
}

/** 403 INSUFFICIENT_SCOPE; `required` names what the key lacks. */
export function insufficientScope(required: string[], message = `This API key lacks the scope ${required.join(', ')}.`): AppError {
  return new AppError(403, 'INSUFFICIENT_SCOPE', message, { required });
}

export const serializeScopes = (scopes: readonly string[]): string => scopes.join(' ');
export const parseScopes = (stored: string): string[] => (stored === '' ? [] : stored.split(' '));
