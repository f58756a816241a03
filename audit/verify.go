package audit

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"slices"
	"time"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/kms"
)

// Problem says what is wrong with a log: which check failed, and where.
type Problem struct {
	Check string // "signature", "record", "chain", "root", "truncated", "rollback", "fork", "proof", "restored"
	Index int64  // record index, or -1
	Msg   string
}

func (p *Problem) Error() string {
	if p.Index >= 0 {
		return fmt.Sprintf("%s check failed at record %d: %s", p.Check, p.Index, p.Msg)
	}
	return fmt.Sprintf("%s check failed: %s", p.Check, p.Msg)
}

func problem(check string, index int64, format string, args ...any) *Problem {
	return &Problem{Check: check, Index: index, Msg: fmt.Sprintf(format, args...)}
}

// Result is what a successful verification established.
type Result struct {
	Size      uint64    // records covered by the latest checkpoint, all verified
	Root      tlog.Hash // its root
	Uncovered int       // records past the latest checkpoint (not yet provable)
}

func (r *Result) String() string {
	s := fmt.Sprintf("audit log intact: %d records verified against the signed checkpoint of size %d, root %s",
		r.Size, r.Size, base64.StdEncoding.EncodeToString(r.Root[:]))
	if r.Uncovered > 0 {
		s += fmt.Sprintf(" (%d newer records await the next checkpoint)", r.Uncovered)
	}
	return s
}

// MemoryTree computes tree hashes of records held in memory.
type MemoryTree struct {
	hashes []tlog.Hash // tlog storage layout
	leaves []tlog.Hash
}

// ReadHashes implements tlog.HashReader.
func (m *MemoryTree) ReadHashes(indexes []int64) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(indexes))
	for i, x := range indexes {
		if x < 0 || x >= int64(len(m.hashes)) {
			return nil, fmt.Errorf("hash %d not computed", x)
		}
		out[i] = m.hashes[x]
	}
	return out, nil
}

// Append adds a record.
func (m *MemoryTree) Append(data []byte) error {
	hs, err := tlog.StoredHashes(int64(len(m.leaves)), data, m)
	if err != nil {
		return err
	}
	m.hashes = append(m.hashes, hs...)
	m.leaves = append(m.leaves, tlog.RecordHash(data))
	return nil
}

// Root is the root of the first n records.
func (m *MemoryTree) Root(n uint64) (tlog.Hash, error) { return tlog.TreeHash(int64(n), m) }

// Leaf is the leaf hash of record i.
func (m *MemoryTree) Leaf(i uint64) tlog.Hash { return m.leaves[i] }

// Verify checks an audit log against the identity public key: every
// checkpoint's signature and origin; that the records are canonical, carry
// their own index and chain each to the one before; that the Merkle root of
// the records equals the root of every checkpoint at its size; that no two
// checkpoints of one size disagree (fork); and that a checkpoint saved earlier
// (saved, optional) is neither newer than the log (rollback) nor of another
// history (fork). checkpoints holds any number of signed checkpoints; the
// largest is the latest. It returns the first problem found, as a *Problem.
func Verify(pub []byte, records [][]byte, checkpoints [][]byte, saved []byte) (*Result, *MemoryTree, error) {
	return VerifySaved(pub, records, checkpoints, saved, nil)
}

// SavedState is what a verifier keeps beside a checkpoint it saves: the
// indexes of the restore records the log held then (kmsctl audit verify
// --save-checkpoint writes it as FILE.restores).
type SavedState struct {
	Restores []uint64 `json:"restores"`
	// LastTime is the time of the last record the saved checkpoint
	// covers (kmsd's clock, as the records say it): a restore whose
	// record is older was already behind the saved log.
	LastTime string `json:"last_time,omitempty"`
}

// StateOf is the state to keep beside a checkpoint of records (all the
// records it covers).
func StateOf(records [][]byte) SavedState {
	st := SavedState{Restores: append([]uint64{}, RestoreRecords(records)...)}
	if len(records) > 0 {
		if r, err := kms.DecodeAuditRecord(records[len(records)-1]); err == nil {
			st.LastTime = r.Time
		}
	}
	return st
}

// VerifySaved is Verify, with what was kept beside the saved checkpoint
// (nil: nothing). A saved checkpoint the log does not extend (rollback,
// fork) is reported as "restored" only for a restore record of the log
// that the log's own checkpoint covers (so it was verified as every
// record is) and that state does not list (so it was not in the saved
// checkpoint's log already); otherwise it is a rollback or a fork, whose
// message names the log's newest restore record, if any, for the reader
// to weigh.
func VerifySaved(pub []byte, records [][]byte, checkpoints [][]byte, saved []byte, state *SavedState) (*Result, *MemoryTree, error) {
	type cp struct {
		c     Checkpoint
		saved bool
		n     int
	}
	var cps []cp
	for i, msg := range checkpoints {
		c, err := OpenCheckpoint(msg, pub)
		if err != nil {
			return nil, nil, problem("signature", -1, "checkpoint %d: %v", i+1, err)
		}
		cps = append(cps, cp{c: c, n: i + 1})
	}
	if len(cps) == 0 {
		return nil, nil, problem("signature", -1, "no checkpoint to verify against")
	}
	if saved != nil {
		c, err := OpenCheckpoint(saved, pub)
		if err != nil {
			return nil, nil, problem("signature", -1, "saved checkpoint: %v", err)
		}
		cps = append(cps, cp{c: c, saved: true})
	}
	slices.SortStableFunc(cps, func(a, b cp) int {
		switch {
		case a.c.Size < b.c.Size:
			return -1
		case a.c.Size > b.c.Size:
			return 1
		}
		return 0
	})
	// savedProb is the saved checkpoint's problem, told once the log
	// itself verified (a restore may explain it).
	var savedProb *Problem
	var savedSize uint64
	for i := 1; i < len(cps); i++ {
		if cps[i].c.Size == cps[i-1].c.Size && cps[i].c.Root != cps[i-1].c.Root {
			if cps[i].saved || cps[i-1].saved {
				if savedProb == nil {
					savedProb, savedSize = problem("fork", -1, "the saved checkpoint and the log's of size %d have different roots", cps[i].c.Size), cps[i].c.Size
				}
				continue
			}
			return nil, nil, problem("fork", -1, "two checkpoints of size %d have different roots", cps[i].c.Size)
		}
	}
	// The latest is the largest checkpoint the log itself offers.
	var latest Checkpoint
	for _, c := range cps {
		if !c.saved {
			latest = c.c
		}
	}
	for _, c := range cps {
		if c.saved && c.c.Size > latest.Size && savedProb == nil {
			savedProb, savedSize = problem("rollback", -1, "a saved checkpoint covers %d records but the log's latest checkpoint only %d", c.c.Size, latest.Size), c.c.Size
		}
	}
	if uint64(len(records)) < latest.Size {
		return nil, nil, problem("truncated", int64(len(records)), "the checkpoint covers %d records, only %d are present", latest.Size, len(records))
	}
	tree := &MemoryTree{}
	next := 0
	for i := uint64(0); i < latest.Size; i++ {
		r, err := kms.DecodeAuditRecord(records[i])
		if err != nil {
			return nil, nil, problem("record", int64(i), "malformed or not canonical: %v", err)
		}
		if r.Index != i {
			return nil, nil, problem("record", int64(i), "it carries index %d: records were deleted, inserted or reordered", r.Index)
		}
		if i > 0 {
			want := tree.Leaf(i - 1)
			if r.PrevHash != hex.EncodeToString(want[:]) {
				return nil, nil, problem("chain", int64(i-1), "record %d names another hash for record %d: one of the two was changed", i, i-1)
			}
		} else if r.PrevHash != "" {
			return nil, nil, problem("chain", 0, "the first record names a predecessor")
		}
		if err := tree.Append(records[i]); err != nil {
			return nil, nil, err
		}
		for next < len(cps) && cps[next].c.Size == i+1 {
			root, err := tree.Root(i + 1)
			if err != nil {
				return nil, nil, err
			}
			if root != cps[next].c.Root {
				if cps[next].saved {
					if savedProb == nil {
						savedProb, savedSize = problem("root", int64(i), "the records [0, %d) do not hash to the root of the saved checkpoint of that size: records were changed or the log was rewritten (fork)", i+1), cps[next].c.Size
					}
					next++
					continue
				}
				return nil, nil, problem("root", int64(i), "the records [0, %d) do not hash to the root of the log's checkpoint of that size: records were changed or the log was rewritten (fork)", i+1)
			}
			next++
		}
	}
	if savedProb != nil {
		// The log verified up to its latest checkpoint: its restore
		// records can be weighed.
		return nil, nil, explainSaved(savedProb, records[:latest.Size], savedSize, state)
	}
	return &Result{Size: latest.Size, Root: latest.Root, Uncovered: len(records) - int(latest.Size)}, tree, nil
}

// RestoreRecords lists the indexes of the restore records among records.
func RestoreRecords(records [][]byte) []uint64 {
	var out []uint64
	for _, b := range records {
		if r, err := kms.DecodeAuditRecord(b); err == nil && r.Operation == kms.RestoreOp && r.Restore != nil && r.Actor == "system" {
			out = append(out, r.Index)
		}
	}
	return out
}

// explainSaved returns p, the saved checkpoint's problem, or "restored"
// when a restore the saved state did not know explains it: of the
// verified restore records that the state does not list and that are
// later than the last record the saved checkpoint covered, the first that
// kept fewer records than the saved checkpoint covers.
func explainSaved(p *Problem, verified [][]byte, saved uint64, state *SavedState) *Problem {
	idx := RestoreRecords(verified)
	if len(idx) == 0 {
		return p
	}
	var last time.Time
	if state != nil && state.LastTime != "" {
		last, _ = time.Parse(time.RFC3339Nano, state.LastTime)
	}
	var found *kms.AuditRecord
	for _, i := range idx {
		r, _ := kms.DecodeAuditRecord(verified[i])
		kept := max(r.Restore.BackupSize, r.Restore.ArchiveSize)
		at, err := time.Parse(time.RFC3339Nano, r.Time)
		if state == nil || slices.Contains(state.Restores, r.Index) || kept >= saved || err != nil || !at.After(last) {
			continue
		}
		found = r
		break
	}
	if found == nil {
		newest, _ := kms.DecodeAuditRecord(verified[idx[len(idx)-1]])
		p.Msg += fmt.Sprintf(" (the log holds a restore record at %d: from backup %s made %s; if a restore came after you saved the checkpoint, it may explain this: a checkpoint saved with kmsctl audit verify --save-checkpoint keeps what tells them apart)", newest.Index, newest.Restore.Backup, newest.Restore.Created)
		return p
	}
	kept := max(found.Restore.BackupSize, found.Restore.ArchiveSize)
	return problem("restored", int64(found.Index), "rolled back by a restore: the saved checkpoint covers %d records, and the log was restored from backup %s (made %s) holding %d records; records %d to %d of the saved checkpoint's log are not in this log (it continues at %d with the restore record of %s, which the log's checkpoint covers and which came after the checkpoint you saved). Re-pin a checkpoint of this log once you have checked the restore was intended",
		saved, found.Restore.Backup, found.Restore.Created, kept, kept, saved-1, found.Index, found.Time)
}
