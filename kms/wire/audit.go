package wire

import "encoding/json"

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
	// Run is the threshold protocol run a request took part in: the same
	// id in the records of every node.
	Run string `json:"run,omitempty"`
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

	// Restore says what a restore record (operation "restore") restored:
	// which backup, how many records the backup's log held, and up to
	// where the log was read back from an audit archive.
	Restore *RestoreInfo `json:"restore,omitempty"`

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

// RestoreOp is the operation of the record a restore appends.
const RestoreOp = "restore"

// RestoreInfo is what a restore record says about the restore.
type RestoreInfo struct {
	// Backup is the SHA-256 (hex) of the backup file before its trailer:
	// the id kmsctl backup printed.
	Backup string `json:"backup"`
	// BackupSize is how many records the backup's log held.
	BackupSize uint64 `json:"backup_size"`
	// ArchiveSize is the size of the archive's checkpoint the log was
	// read back up to (0: no archive, or none beyond the backup).
	ArchiveSize uint64 `json:"archive_size,omitempty"`
	// Created is when the backup was made (RFC 3339, UTC).
	Created string `json:"created"`
}
