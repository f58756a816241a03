package store

import (
	"context"

	"github.com/kmsd-project/kmsd/kms"
)

// Sink receives a store's content in a form no driver owns: what a backup
// file holds (store/backup) and what a driver's Load writes into an empty
// store. Records come without their tags: each store authenticates what
// it holds under its own record key. Indexes (destroy schedule, blob
// owners) are not sent: they follow from the versions.
//
// A dump sends, in this order: kmsd's metadata, the keys, each key's
// versions, the tokens, the audit log's rows, its end, its latest signed
// checkpoint and the records a replicated store has not made rows yet.
type Sink interface {
	// Meta is one of kmsd's metadata records (Backend.Meta).
	Meta(name string, value []byte) error
	// Key is a key's header.
	Key(k *kms.Key) error
	// Version is one version of the key named.
	Version(key string, v *kms.Version) error
	// Token is a token record (the token's hash, never the token).
	Token(t *kms.Token) error
	// AuditRow is the audit log's row at index (audit/engine decides what
	// it holds). Rows come in index order; below the end's prunedBelow
	// only the rows a pruned log keeps (engine.Keep).
	AuditRow(index uint64, row []byte) error
	// AuditEnd is the index after the last row and the index below which
	// rows may be absent (0: none pruned).
	AuditEnd(end, prunedBelow uint64) error
	// Checkpoint is the latest signed checkpoint (none if the log has
	// none yet).
	Checkpoint(size uint64, note []byte) error
	// Pending are records a replicated store committed (with the change
	// they record) but has not sealed into rows yet, in commit order:
	// canonical records without their index, which follow the rows.
	Pending(recs [][]byte) error
}

// Dumper is a Backend that sends everything it holds to a Sink, as of one
// moment: one read transaction (bbolt) or one revision (etcd).
type Dumper interface {
	Dump(ctx context.Context, to Sink) error
}

// Loader is a Conn that fills an empty store from a dump, all or nothing:
// feed sends the content to the Sink it is given; then finish (if set)
// gets the loaded store, open, to finish it (kmsd restore: the audit log
// read back from an archive, the restore record) before the store can be
// started on. If feed, finish or the load fails, the target is left as it
// was (or as a load that did not finish, which kmsd refuses to start on
// and a new load replaces).
type Loader interface {
	Load(ctx context.Context, sealer kms.Sealer, feed func(Sink) error, finish func(Backend) error) error
}
