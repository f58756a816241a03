package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/he/s3blobs"
	"github.com/kmsd-project/kmsd/internal/s3conn"
	"github.com/kmsd-project/kmsd/internal/tlsutil"
)

// s3OrphanGrace: blobs in a shared bucket that no committed version lists
// are removed only once this old, since another replica may be generating
// the keyset they belong to.
const s3OrphanGrace = time.Hour

var (
	s3PrefixRE = regexp.MustCompile(`^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/$`)
	s3BucketRE = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$`)
)

// checkBlobs checks the S3 blob settings before anything touches the disk.
func checkBlobs(c config, getenv func(string) string) error {
	if c.s3Endpoint == "" {
		if c.s3Bucket != "" || c.s3CA != "" {
			return errors.New("--s3-bucket and --s3-ca go with --s3-endpoint")
		}
		return nil
	}
	if _, err := s3blobs.CheckEndpoint(c.s3Endpoint); err != nil {
		// Not echoed: the URL may hold a secret.
		return fmt.Errorf("--s3-endpoint: %w", err)
	}
	if c.s3Bucket == "" {
		return errors.New("--s3-endpoint needs --s3-bucket (an existing bucket; kmsd does not create it)")
	}
	if !s3BucketRE.MatchString(c.s3Bucket) {
		return fmt.Errorf("--s3-bucket %q is not a bucket name: 3 to 63 lower-case letters, digits, '.' or '-'", clipFlag(c.s3Bucket))
	}
	if !s3PrefixRE.MatchString(c.s3Prefix) || len(c.s3Prefix) > 256 || slices.ContainsFunc(strings.Split(c.s3Prefix, "/"), func(seg string) bool { return strings.Trim(seg, ".") == "" && seg != "" }) {
		return fmt.Errorf("--s3-prefix %q: want path segments of letters, digits, '.', '_' or '-', each followed by '/', none only dots (e.g. kmsd/blobs/)", clipFlag(c.s3Prefix))
	}
	if getenv("AWS_ACCESS_KEY_ID") == "" || getenv("AWS_SECRET_ACCESS_KEY") == "" {
		return errors.New("--s3-endpoint needs credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)")
	}
	if c.s3CA != "" {
		if _, err := tlsutil.LoadPool(c.s3CA); err != nil {
			return fmt.Errorf("--s3-ca: %w", err)
		}
	}
	return nil
}

func clipFlag(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// s3Conn is the S3 server --s3-endpoint names, with the credentials from
// the environment and the CA of --s3-ca: the HE blobs' bucket and the
// audit archive's.
func s3Conn(c config, getenv func(string) string) (s3conn.Config, error) {
	cfg := s3conn.Config{Endpoint: c.s3Endpoint, Region: c.s3Region,
		AccessKeyID: getenv("AWS_ACCESS_KEY_ID"), SecretAccessKey: getenv("AWS_SECRET_ACCESS_KEY"), SessionToken: getenv("AWS_SESSION_TOKEN")}
	if c.s3CA != "" {
		pool, err := tlsutil.LoadPool(c.s3CA)
		if err != nil {
			return cfg, fmt.Errorf("--s3-ca: %w", err)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// openBlobs opens the S3 blob store; nil when kmsd keeps blobs in
// <data-dir>/blobs.
func openBlobs(ctx context.Context, c config, getenv func(string) string) (he.Blobs, error) {
	if c.s3Endpoint == "" {
		return nil, nil
	}
	conn, err := s3Conn(c, getenv)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	return s3blobs.Open(ctx, s3blobs.Config{Endpoint: conn.Endpoint, Bucket: c.s3Bucket, Prefix: c.s3Prefix, Region: conn.Region,
		AccessKeyID: conn.AccessKeyID, SecretAccessKey: conn.SecretAccessKey, SessionToken: conn.SessionToken, RootCAs: conn.RootCAs,
		SpoolDir: filepath.Join(c.dataDir, "blob-spool")})
}
