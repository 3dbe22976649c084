import Ajv2020, { type ErrorObject, type ValidateFunction } from 'ajv/dist/2020';
import addFormats from 'ajv-formats';
import { fullFormats } from 'ajv-formats/dist/formats';
import type { JsonSchema, OperationSpec, ParameterSpec } from '../openapi/spec';
import { type FieldProblem, validationError } from './errors';

export interface ValidatedInput {
  params: Record<string, unknown>;
  query: Record<string, unknown>;
  body: unknown;
}

function makeAjv(forStrings: boolean): Ajv2020 {
  // Path and query values arrive as strings: coerce them to the declared types (and fill defaults).
  // Bodies are JSON and are never coerced: "5" is not 5.
  const ajv = new Ajv2020({
    allErrors: true,
    strict: true,
    strictTypes: false,
    coerceTypes: forStrings,
    useDefaults: forStrings,
  });
  addFormats(ajv, ['email', 'date', 'date-time', 'uri']);
  // int32/int64 document the size of an integer for clients; `type: integer` and minimum/maximum
  // already refuse everything they would, with one message per field instead of two.
  for (const name of ['int32', 'int64']) ajv.addFormat(name, { type: 'number', validate: () => true });
  ajv.addKeyword('example');
  return ajv;
}

/**
 * A body's date-time as milliseconds. The schema accepts what RFC 3339 allows, but Date cannot hold
 * every such time (a leap second, 23:59:60): that is a 400 for the field, not a 500.
 */
export function parseBodyTime(field: string, value: string): number {
  const ms = Date.parse(value);
  if (Number.isNaN(ms)) throw validationError([{ field, in: 'body', message: 'is not a time keyward can represent (leap seconds are not supported)' }]);
  return ms;
}

/**
 * The expiry a body asks for, as `expires_in` (seconds from now) or `expires_at` (in the future), never
 * both: milliseconds, or null for none asked; `field` names the one given, for the caller's own bounds.
 */
export function requestedExpiry(input: { expires_in?: number; expires_at?: string }, now: Date): { at: number | null; field: 'expires_in' | 'expires_at' } {
  if (input.expires_in !== undefined && input.expires_at !== undefined) {
    throw validationError([{ field: 'expires_at', in: 'body', message: 'give expires_in or expires_at, not both' }]);
  }
  if (input.expires_at !== undefined) {
    const at = parseBodyTime('expires_at', input.expires_at);
    if (at <= now.getTime()) throw validationError([{ field: 'expires_at', in: 'body', message: 'must be in the future' }]);
    return { at, field: 'expires_at' };
  }
  return { at: input.expires_in === undefined ? null : now.getTime() + input.expires_in * 1000, field: 'expires_in' };
}

/** The email rule the API's `format: email` (and `maxLength: 254`) applies, for emails that arrive outside a body. */
export function isEmail(text: string): boolean {
  return text.length <= 254 && (fullFormats.email as RegExp).test(text);
}

const stringsAjv = makeAjv(true);
const bodyAjv = makeAjv(false);

function objectSchema(parameters: ParameterSpec[]): JsonSchema {
  return {
    type: 'object',
    properties: Object.fromEntries(parameters.map((p) => [p.name, p.schema])),
    required: parameters.filter((p) => p.required).map((p) => p.name),
    // Unknown query parameters are refused like unknown body fields: a typo must not be ignored.
    additionalProperties: false,
  };
}

function join(base: string, key: string): string {
  return base === '' ? key : `${base}.${key}`;
}

export function toProblems(where: FieldProblem['in'], errors: ErrorObject[] | null | undefined): FieldProblem[] {
  const problems: FieldProblem[] = [];
  const seen = new Set<string>();
  for (const e of errors ?? []) {
    const path = e.instancePath.split('/').slice(1).map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~')).join('.');
    let field = path;
    let message = e.message ?? 'is not valid';
    if (e.keyword === 'required') {
      field = join(path, (e.params as { missingProperty: string }).missingProperty);
      message = 'is required';
    } else if (e.keyword === 'additionalProperties') {
      field = join(path, (e.params as { additionalProperty: string }).additionalProperty);
      message = 'is not a known field';
    }
    const problem = { field: field === '' ? where : field, in: where, message };
    const key = `${problem.field}|${message}`;
    if (!seen.has(key)) {
      seen.add(key);
      problems.push(problem);
    }
  }
  return problems;
}

/**
 * Where a NUL character sits in a value (a string, or a key or string inside it), or null. Iterative,
 * because bodies can be deep.
 */
function nulAt(value: unknown): string | null {
  const stack: Array<[unknown, string]> = [[value, '']];
  while (stack.length > 0) {
    const [current, path] = stack.pop()!;
    if (typeof current === 'string') {
      if (current.includes('\u0000')) return path;
      continue;
    }
    if (typeof current !== 'object' || current === null) continue;
    for (const [key, child] of Object.entries(current)) {
      const childPath = join(path, key);
      if (key.includes('\u0000')) return childPath;
      stack.push([child, childPath]);
    }
  }
  return null;
}

export interface OperationValidator {
  (raw: { params: Record<string, unknown>; query: Record<string, unknown>; body: unknown; hasBody: boolean }): ValidatedInput;
}

// Ajv caches by schema object, and every operation builds its own objects: 43 operations asked for 97
// compilations of 18 different schemas, and compiling was most of start-up's memory (~35 MB of peak
// RSS). Validators are synchronous and read their `errors` right after the call, so one compiled
// function can serve every operation with the same schema.
const compiledByText = new Map<Ajv2020, Map<string, ValidateFunction>>();

function compile(ajv: Ajv2020, schema: JsonSchema): ValidateFunction {
  let cache = compiledByText.get(ajv);
  if (!cache) compiledByText.set(ajv, (cache = new Map()));
  const text = JSON.stringify(schema);
  let validate = cache.get(text);
  if (!validate) cache.set(text, (validate = ajv.compile(schema)));
  return validate;
}

export function buildValidator(op: OperationSpec): OperationValidator {
  const params = compile(stringsAjv, objectSchema(op.parameters.filter((p) => p.in === 'path')));
  const query = compile(stringsAjv, objectSchema(op.parameters.filter((p) => p.in === 'query')));
  const body: ValidateFunction | undefined = op.requestBody ? compile(bodyAjv, op.requestBody.schema) : undefined;

  return (raw) => {
    const input: ValidatedInput = { params: { ...raw.params }, query: { ...raw.query }, body: raw.body };
    const problems: FieldProblem[] = [];
    if (!params(input.params)) problems.push(...toProblems('path', params.errors));
    if (!query(input.query)) problems.push(...toProblems('query', query.errors));
    if (body && raw.hasBody && !body(input.body)) problems.push(...toProblems('body', body.errors));
    if (op.requestBody?.required && !raw.hasBody) {
      problems.push({ field: 'body', in: 'body', message: 'a JSON body is required' });
    }
    if (!op.requestBody && raw.hasBody) {
      problems.push({ field: 'body', in: 'body', message: 'this operation takes no request body' });
    }
    // Ajv coerces "Infinity" (and "1e400") to an integer, then skips minimum and maximum for a number
    // that is not finite: no id, limit or count keyward takes is infinite, and the database would
    // fail on one.
    for (const [where, values] of [['path', input.params], ['query', input.query]] as const) {
      for (const [field, value] of Object.entries(values)) {
        if ((Array.isArray(value) ? value : [value]).some((v) => typeof v === 'number' && !Number.isFinite(v))) {
          problems.push({ field, in: where, message: 'must be a finite number' });
        }
      }
    }
    // PostgreSQL cannot store NUL in text (it would be a 500), and SQLite would keep it silently: no
    // value keyward stores or looks up has a use for one, so it is refused on both.
    for (const [where, value] of [['path', input.params], ['query', input.query], ['body', input.body]] as const) {
      const field = nulAt(value);
      if (field !== null) problems.push({ field: field === '' ? where : field, in: where, message: 'must not contain NUL characters' });
    }
    if (problems.length > 0) throw validationError(problems);
    return input;
  };
}
