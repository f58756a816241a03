package kms

import (
	"context"
)

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
