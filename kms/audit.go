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

// Call is one request to the service: the audit record its state change
// commits with, in the change's own transaction (and marks Committed),
// completed with the key, version or token it touched, and that its reads
// fill in (the attestation a decryption went by, the precision it
// returned). The API builds the record, one per request, in its audit
// middleware. The Service's own methods are a Call without a record:
// start-up and tests, which audit nothing.
type Call struct {
	*Service
	rec *AuditRecord
}

// For is the service for one request, whose audit record is rec (nil:
// none).
func (s *Service) For(rec *AuditRecord) Call { return Call{Service: s, rec: rec} }

// auditFor returns rec completed for a change to key and version, or nil
// without a record.
func auditFor(rec *AuditRecord, key string, version uint64) []*AuditRecord {
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

// auditForToken returns rec completed for a change to the token with the
// id, or nil without a record.
func auditForToken(rec *AuditRecord, id string) []*AuditRecord {
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
