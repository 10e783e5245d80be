-- Refusal counts are kept in each server's memory and written only as audit events, under their
-- row MAC (kms.audit.refusals). This table held them with no MAC: a database writer could delete
-- counted refusals, or invent counts the KMS would then have written as MAC'd events. Whatever an
-- older version left in it cannot be told from an invented count, so it goes with the table.
DROP TABLE audit_refusals;
