package kms

import (
	"context"
	"encoding/json"
)

// AuditRecord is one entry of the audit log: one request, or one action the
// service took on its own (actor "system"). It never holds key material,
// plaintexts, signatures' messages, shared secrets, tokens or PINs.
//
// Canonical encoding (the exact bytes hashed into the Merkle tree leaf):
// encoding/json of this struct, fields in the order below, empty optional
// fields omitted, no insignificant white space, no trailing newline.
type AuditRecord struct {
	Index     uint64 `json:"index"`          // position in the log, from 0
	PrevHash  string `json:"prev,omitempty"` // hex RFC 6962 leaf hash of record index-1
	Time      string `json:"time"`           // RFC 3339, UTC, nanoseconds
	RequestID string `json:"request_id,omitempty"`
	Actor     string `json:"actor"` // token id, "anonymous" or "system"
	Role      string `json:"role,omitempty"`
	Source    string `json:"source,omitempty"` // client address
	Operation string `json:"operation"`        // e.g. "POST /v1/keys/{name}/rotate"
	Key       string `json:"key,omitempty"`
	Version   uint64 `json:"version,omitempty"`
	Token     string `json:"token,omitempty"`   // id (never the secret) of the token a token operation touched
	Status    int    `json:"status"`            // HTTP status of the answer
	Problem   string `json:"problem,omitempty"` // problem type on failure
	// Tampered names the stored record that failed its integrity check
	// (problem store-tampered).
	Tampered string `json:"tampered,omitempty"`
	// The attestation an HE request issued or decrypted under (its id), the
	// token that vouched for the ciphertext, its type and operation
	// ("input:encrypt", "evaluation:he_linear"), and an evaluation's inputs
	// as "<attestation id>:<token id>".
	Attestation string   `json:"attestation,omitempty"`
	Attester    string   `json:"attester,omitempty"`
	AttestedOp  string   `json:"attested_op,omitempty"`
	Inputs      []string `json:"inputs,omitempty"`
	// Precision is the bits of precision a CKKS decryption returned after
	// noise flooding.
	Precision int `json:"precision,omitempty"`
	ReqBytes  int `json:"req_bytes,omitempty"`
	RespBytes int `json:"resp_bytes,omitempty"` // omitted for state changes: the record commits before the answer is written
	// A summary of requests refused over a rate limit: how many, the first
	// and the last (RFC 3339, UTC).
	Count uint64 `json:"count,omitempty"`
	First string `json:"first,omitempty"`
	Last  string `json:"last,omitempty"`

	// Committed is set once the record is durable in the log; not encoded.
	Committed bool `json:"-"`
}

// Encode returns the canonical encoding.
func (r *AuditRecord) Encode() []byte {
	b, err := json.Marshal(r)
	if err != nil {
		panic("kms: audit record does not encode: " + err.Error()) // only strings and ints: cannot happen
	}
	return b
}

// DecodeAuditRecord parses a record and checks that the bytes are its
// canonical encoding.
func DecodeAuditRecord(b []byte) (*AuditRecord, error) {
	var r AuditRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, err
	}
	if string(r.Encode()) != string(b) {
		return nil, Errorf(KindInvalid, "record is not in canonical form")
	}
	return &r, nil
}

// AuditStore is the durable, append-only audit log. Implementations append
// the records a state change carries (see Store) in the same transaction as
// the change.
type AuditStore interface {
	// AppendAudit makes rec durable as the next record and sets
	// Committed. Its place in the log is fixed then: a local store sets
	// Index too; a replicated store writes the index when it seals the
	// record (in commit order), before any read of the log returns.
	// Concurrent calls share commits (group commit).
	AppendAudit(ctx context.Context, rec *AuditRecord) error
	// Expect announces that a record is on its way (a request is being
	// served); release says it was handed to AppendAudit or will not
	// come, and may be called more than once. A group commit may wait
	// briefly for announced records so that more requests share it.
	Expect() (release func())
	// AuditSize is the number of records.
	AuditSize(ctx context.Context) (uint64, error)
	// AuditRecords returns the encoded records [start, end).
	AuditRecords(ctx context.Context, start, end uint64) ([][]byte, error)
	// AuditHashes returns the Merkle tree hashes stored at the given
	// storage indexes (golang.org/x/mod/sumdb/tlog numbering), of a tree
	// no larger than a size AuditSize returned.
	AuditHashes(ctx context.Context, indexes []int64) ([][32]byte, error)
	// PutCheckpoint stores a signed checkpoint of the tree at size.
	PutCheckpoint(ctx context.Context, size uint64, note []byte) error
	// LatestCheckpoint returns the newest checkpoint; ErrNotFound if none.
	LatestCheckpoint(ctx context.Context) (uint64, []byte, error)
}

type auditKey struct{}

// WithAudit attaches a pending record to ctx: a state change made with this
// ctx commits the record (completed with the key and version it touched) in
// its own transaction and marks it Committed.
func WithAudit(ctx context.Context, rec *AuditRecord) context.Context {
	return context.WithValue(ctx, auditKey{}, rec)
}

// auditRecord is the pending record of ctx, or nil.
func auditRecord(ctx context.Context) *AuditRecord {
	rec, _ := ctx.Value(auditKey{}).(*AuditRecord)
	return rec
}

// auditFor returns the pending record of ctx completed for a change to key
// and version, or nil when ctx carries none (auditing off).
func auditFor(ctx context.Context, key string, version uint64) []*AuditRecord {
	rec := auditRecord(ctx)
	if rec == nil {
		return nil
	}
	if rec.Key == "" {
		rec.Key = key
	}
	if version != 0 {
		rec.Version = version
	}
	return []*AuditRecord{rec}
}

// auditForToken returns the pending record of ctx completed for a change to
// the token with the id, or nil when ctx carries none.
func auditForToken(ctx context.Context, id string) []*AuditRecord {
	rec, _ := ctx.Value(auditKey{}).(*AuditRecord)
	if rec == nil {
		return nil
	}
	rec.Token = id
	return []*AuditRecord{rec}
}

// AuditProver serves the signed view of the audit log.
type AuditProver interface {
	// Latest returns the newest signed checkpoint; ErrNotFound if none.
	Latest(ctx context.Context) ([]byte, error)
	// InclusionProof proves record index is in the tree of the given size.
	InclusionProof(ctx context.Context, index, size uint64) ([][32]byte, error)
	// ConsistencyProof proves the tree of size old is a prefix of the tree
	// of the given size.
	ConsistencyProof(ctx context.Context, old, size uint64) ([][32]byte, error)
}
